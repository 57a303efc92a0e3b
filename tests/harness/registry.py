"""The upstream: distribution 2.8 (`docker-registry serve`) on a free loopback port.

Three auth modes: anonymous, htpasswd basic auth, token (Bearer) auth backed by
`tokenserver.TokenServer`. The access log (combined log format, on stdout) goes to
its own file, so tests can count exactly which blob bytes left the upstream and who
(by User-Agent) asked for them.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

from .ports import LOOPBACK, free_port, wait_http
from .process import ManagedProcess, run
from .tokenserver import TokenServer

if TYPE_CHECKING:
    from .regclient import RegistryClient

AuthMode = Literal["anonymous", "basic", "token"]

# 127.0.0.1 - - [29/Nov/2026:01:54:36 +0000] "GET /v2/x/blobs/sha256:… HTTP/1.1" 404 157 "" "curl/7.88.1"
_ACCESS_LINE = re.compile(
    r'^(?P<remote>\S+) \S+ (?P<user>\S+) \[[^\]]*\] "(?P<method>[A-Z]+) (?P<uri>\S+) [^"]*" '
    r'(?P<status>\d{3}) (?P<size>\d+|-) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"')
_BLOB_PATH = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
_MANIFEST_PATH = re.compile(r"^/v2/(?P<repo>.+)/manifests/(?P<ref>[^/]+)$")


@dataclass(frozen=True)
class AccessEntry:
    """One response the registry completed."""

    method: str
    path: str
    query: str
    status: int
    size: int
    user: str
    user_agent: str

    @property
    def blob_digest(self) -> str | None:
        m = _BLOB_PATH.match(self.path)
        return m.group("digest") if m else None

    @property
    def repo(self) -> str | None:
        m = _BLOB_PATH.match(self.path) or _MANIFEST_PATH.match(self.path)
        return m.group("repo") if m else None

    @property
    def is_manifest(self) -> bool:
        return _MANIFEST_PATH.match(self.path) is not None


class AccessLog:
    """Parsed view of the registry's access log file; `mark()` + `since=` scope a test step."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self, since: int = 0) -> list[AccessEntry]:
        try:
            lines = self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            m = _ACCESS_LINE.match(line)
            if not m:
                continue
            path, _, query = m.group("uri").partition("?")
            out.append(AccessEntry(m.group("method"), path, query, int(m.group("status")),
                                   0 if m.group("size") == "-" else int(m.group("size")),
                                   m.group("user"), m.group("agent")))
        return out[since:]

    def mark(self) -> int:
        """Position to pass as `since=`: entries written so far (after letting the log settle)."""
        self.settle()
        return len(self.entries())

    def settle(self, quiet: float = 0.15, timeout: float = 3.0) -> None:
        """Wait until the file stops growing: the registry logs a line just after the
        response body is sent, so a client can finish a moment before its line appears."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size == last:
                return
            last = size
            time.sleep(quiet)

    def blob_gets(self, since: int = 0, user_agent: str | None = None) -> list[AccessEntry]:
        """Successful blob GETs (200 or 206), optionally only those whose UA contains a string."""
        return [e for e in self.entries(since)
                if e.method == "GET" and e.blob_digest and e.status in (200, 206)
                and (user_agent is None or user_agent in e.user_agent)]

    def blob_bytes(self, since: int = 0, user_agent: str | None = None,
                   digests: set[str] | None = None) -> int:
        """Blob bytes the upstream sent (as written on the wire per the log)."""
        return sum(e.size for e in self.blob_gets(since, user_agent)
                   if digests is None or e.blob_digest in digests)

    def blob_bytes_by_digest(self, since: int = 0) -> dict[str, int]:
        totals: dict[str, int] = {}
        for e in self.blob_gets(since):
            assert e.blob_digest is not None
            totals[e.blob_digest] = totals.get(e.blob_digest, 0) + e.size
        return totals

    def manifest_requests(self, since: int = 0, method: str | None = None) -> int:
        return sum(1 for e in self.entries(since)
                   if e.is_manifest and (method is None or e.method == method))


@dataclass
class Registry:
    """A running distribution registry; `username`/`password` set unless anonymous."""

    mode: AuthMode
    port: int
    workdir: Path
    process: ManagedProcess
    access_log: AccessLog
    username: str | None = None
    password: str | None = None
    token_server: TokenServer | None = None

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`: the registry's name in image references and containerd hosts dirs."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def creds(self) -> tuple[str, str] | None:
        return (self.username, self.password or "") if self.username is not None else None

    def ref(self, repo: str, tag_or_digest: str) -> str:
        sep = "@" if tag_or_digest.startswith("sha256:") else ":"
        return f"{self.host}/{repo}{sep}{tag_or_digest}"

    def client(self) -> "RegistryClient":
        from .regclient import RegistryClient
        return RegistryClient(self.url, self.creds)

    def app_log(self) -> str:
        return self.process.stderr_text()


def _config_yaml(port: int, storage: Path, auth: str) -> str:
    # JSON-style YAML keeps quoting trivial. Access log → stdout, app log → stderr.
    return f"""version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: "{storage}"
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: "{LOOPBACK}:{port}"
  secret: fleetp2p-test-secret
{auth}"""


def htpasswd_line(username: str, password: str) -> str:
    """bcrypt entry: distribution 2.8 accepts nothing else."""
    return run(["htpasswd", "-Bbn", username, password]).stdout.strip() + "\n"


@contextlib.contextmanager
def start_registry(mode: AuthMode = "anonymous", *, username: str = "fleet",
                   password: str = "s3cret-pass", base_dir: Path | None = None,
                   token_users: dict[str, str] | None = None) -> Iterator[Registry]:
    """Run a registry until the block exits; its temp dir is removed afterwards.

    In token mode the token server requires `token_users` (default: {username: password}).
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"registry-{mode}-", dir=base_dir))
    port = free_port()
    token_server: TokenServer | None = None
    process: ManagedProcess | None = None
    try:
        auth = ""
        user = pw = None
        if mode == "basic":
            user, pw = username, password
            (workdir / "htpasswd").write_text(htpasswd_line(username, password))
            auth = f"""auth:
  htpasswd:
    realm: fleetp2p-test-basic
    path: "{workdir / 'htpasswd'}"
"""
        elif mode == "token":
            user, pw = username, password
            token_server = TokenServer(users=token_users if token_users is not None else {username: password})
            token_server.start()
            cert = token_server.write_cert(workdir / "token-signer.pem")
            auth = f"""auth:
  token:
    realm: "{token_server.realm}"
    service: "{token_server.service}"
    issuer: "{token_server.issuer}"
    rootcertbundle: "{cert}"
"""
        elif mode != "anonymous":
            raise ValueError(f"unknown registry auth mode {mode!r}")
        config = workdir / "config.yml"
        config.write_text(_config_yaml(port, workdir / "storage", auth))
        access = workdir / "access.log"
        process = ManagedProcess(["docker-registry", "serve", str(config)],
                                 stdout=access, stderr=workdir / "registry.log").start()
        # /v2/ answers 401 when auth is on: any answer means it is listening.
        wait_http(f"http://{LOOPBACK}:{port}/v2/", timeout=10, ok=(200, 401), alive=process.alive)
        yield Registry(mode, port, workdir, process, AccessLog(access), user, pw, token_server)
    finally:
        if process is not None:
            process.stop()
        if token_server is not None:
            token_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
