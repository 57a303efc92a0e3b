"""A minimal synchronous OCI distribution client with Basic and Bearer auth.

Used to push what skopeo cannot (artifacts with custom media types, pushed by plain
HTTP as a real artifact tool would) and to read back manifests/blobs in assertions.
Streams file bodies so a multi-hundred-MiB blob never sits in memory.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


class RegistryError(RuntimeError):
    pass


class RegistryClient:
    """Talks to one registry base URL (`http://127.0.0.1:PORT`), authenticating on 401."""

    def __init__(self, base_url: str, creds: tuple[str, str] | None = None, timeout: float = 120) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme != "http":
            raise ValueError("test registries are plain http")
        self.base_url = base_url.rstrip("/")
        self.netloc = parsed.netloc
        self.creds = creds
        self.timeout = timeout
        self._auth: dict[str, str] = {}  # scope → Authorization header value
        self.user_agent = "fleetp2p-test-harness"

    # Transport --------------------------------------------------------

    def _raw(self, method: str, target: str, headers: Mapping[str, str],
             body: bytes | BinaryIO | None) -> Response:
        if target.startswith("http://"):
            parsed = urllib.parse.urlsplit(target)
            netloc, target = parsed.netloc, parsed.path + (f"?{parsed.query}" if parsed.query else "")
        else:
            netloc = self.netloc
        conn = http.client.HTTPConnection(netloc, timeout=self.timeout, blocksize=1 << 20)
        try:
            conn.request(method, target, body=body, headers={"User-Agent": self.user_agent, **headers})
            resp = conn.getresponse()
            return Response(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def request(self, method: str, target: str, *, scope: str = "", headers: Mapping[str, str] | None = None,
                body: bytes | Path | None = None) -> Response:
        """One request; on 401 obtain credentials for the challenge and retry once."""
        headers = dict(headers or {})
        for attempt in range(2):
            h = dict(headers)
            if scope in self._auth:
                h["Authorization"] = self._auth[scope]
            if isinstance(body, Path):
                h["Content-Length"] = str(body.stat().st_size)
                with open(body, "rb") as f:
                    resp = self._raw(method, target, h, f)
            else:
                resp = self._raw(method, target, h, body)
            if resp.status != 401 or attempt == 1:
                return resp
            self._auth[scope] = self._answer_challenge(resp.header("WWW-Authenticate") or "", scope)
        raise AssertionError("unreachable")

    def _answer_challenge(self, challenge: str, scope: str) -> str:
        kind, _, params_text = challenge.partition(" ")
        if kind.lower() == "basic":
            if self.creds is None:
                raise RegistryError("registry wants basic auth and no credentials were given")
            return "Basic " + base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
        if kind.lower() != "bearer":
            raise RegistryError(f"unsupported challenge {challenge!r}")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        query = {"service": params.get("service", "")}
        wanted = params.get("scope") or scope
        if wanted:
            query["scope"] = wanted
        realm = params["realm"]
        headers = {}
        if self.creds is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(
                f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
        resp = self._raw("GET", f"{realm}?{urllib.parse.urlencode(query)}", headers, None)
        if resp.status != 200:
            raise RegistryError(f"token server said {resp.status}: {resp.body[:300]!r}")
        data = json.loads(resp.body)
        return "Bearer " + (data.get("token") or data["access_token"])

    # OCI API ------------------------------------------------------------

    @staticmethod
    def _scope(repo: str, push: bool = False) -> str:
        return f"repository:{repo}:{'pull,push' if push else 'pull'}"

    def blob_exists(self, repo: str, digest: str) -> bool:
        resp = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", scope=self._scope(repo))
        return resp.status == 200

    def push_blob(self, repo: str, digest: str, source: bytes | Path) -> None:
        """Monolithic upload: POST for a session, PUT ?digest= with the whole body."""
        scope = self._scope(repo, push=True)
        if self.blob_exists(repo, digest):
            return
        start = self.request("POST", f"/v2/{repo}/blobs/uploads/", scope=scope,
                             headers={"Content-Length": "0"}, body=b"")
        if start.status != 202:
            raise RegistryError(f"upload start for {repo}: {start.status} {start.body[:300]!r}")
        location = start.header("Location") or ""
        if location.startswith("/"):
            location = self.base_url + location
        sep = "&" if "?" in location else "?"
        put = self.request("PUT", f"{location}{sep}digest={urllib.parse.quote(digest)}", scope=scope,
                           headers={"Content-Type": "application/octet-stream"}, body=source)
        if put.status != 201:
            raise RegistryError(f"upload of {digest} to {repo}: {put.status} {put.body[:300]!r}")

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        resp = self.request("PUT", f"/v2/{repo}/manifests/{reference}", scope=self._scope(repo, push=True),
                            headers={"Content-Type": media_type}, body=data)
        if resp.status != 201:
            raise RegistryError(f"manifest PUT {repo}:{reference}: {resp.status} {resp.body[:500]!r}")
        digest = resp.header("Docker-Content-Digest") or ""
        expected = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest and digest != expected:
            raise RegistryError(f"registry changed the manifest digest: {digest} != {expected}")
        return expected

    def get_manifest(self, repo: str, reference: str, accept: str = MANIFEST_ACCEPT) -> Response:
        return self.request("GET", f"/v2/{repo}/manifests/{reference}", scope=self._scope(repo),
                            headers={"Accept": accept})

    def get_blob(self, repo: str, digest: str, headers: Mapping[str, str] | None = None) -> Response:
        return self.request("GET", f"/v2/{repo}/blobs/{digest}", scope=self._scope(repo), headers=headers)
