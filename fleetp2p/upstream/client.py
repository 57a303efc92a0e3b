"""Talking to upstream registries.

Every reply is checked before it is trusted: manifests against their digest,
blob bodies against Content-Length, Range replies against Content-Range. A
blob body that stalls or is cut is resumed with a Range request from where it
stopped, so one bad connection never restarts a 20 GB download.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

import aiohttp

from fleetp2p import __version__
from fleetp2p.config import Config, Registry
from fleetp2p.errors import UpstreamError
from fleetp2p.metrics import Metrics
from fleetp2p.oci.reference import Digest, is_digest
from fleetp2p.registry.ranges import parse_content_range
from fleetp2p.upstream.auth import TokenCache, basic_header, fetch_token, parse_challenge

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_REDIRECTS = 5
MAX_RETRY_AFTER = 30.0


@dataclass(frozen=True)
class UpstreamManifest:
    content: bytes
    media_type: str
    digest: Digest


class UpstreamClient:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.tokens = TokenCache()
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=None, connect=config.upstream_connect_timeout,
                                              sock_connect=config.upstream_connect_timeout)
        # Headers must arrive within the stall timeout too; bodies are watched per read.
        self._header_timeout = max(config.upstream_stall_timeout, config.upstream_connect_timeout)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, auto_decompress=False,
                connector=aiohttp.TCPConnector(limit=256, limit_per_host=64, ttl_dns_cache=60),
                headers={"User-Agent": f"fleetp2p/{__version__}"})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # Public operations --------------------------------------------------

    async def get_manifest(self, registry: str, repository: str, reference: str,
                           accept: list[str]) -> UpstreamManifest:
        headers = {"Accept": ", ".join(accept)} if accept else {}
        resp = await self.request("GET", registry, repository, f"manifests/{reference}", headers,
                                  kind="manifest")
        async with resp:
            limit = self.config.manifest_limit_bytes()
            declared = resp.content_length
            if declared is not None and declared > limit:
                raise UpstreamError(f"manifest of {declared} bytes exceeds max_manifest_size",
                                    reason="invalid", status=502)
            try:
                content = await self._read_limited(resp, limit)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                self.metrics.upstream_errors.labels("manifest", "connection").inc()
                raise UpstreamError(f"manifest body failed: {e or type(e).__name__}",
                                    reason="connection", status=502) from None
            if declared is not None and len(content) != declared:
                raise self._invalid("manifest", f"manifest body has {len(content)} bytes, "
                                    f"Content-Length said {declared}")
            self.metrics.upstream_bytes.labels("manifest").inc(len(content))
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            header_digest = resp.headers.get("Docker-Content-Digest")
        expected = Digest.parse(reference) if is_digest(reference) else None
        if expected is None and header_digest:
            try:
                expected = Digest.parse(header_digest)
            except Exception:
                expected = None
        algorithm = expected.algorithm if expected else "sha256"
        actual = Digest(algorithm, hashlib.new(algorithm, content).hexdigest())
        if expected is not None and actual != expected:
            self.metrics.verification_failures.labels("manifest").inc()
            raise self._invalid("manifest", f"manifest content is {actual}, expected {expected}")
        if algorithm != "sha256":
            actual = Digest("sha256", hashlib.sha256(content).hexdigest())
        return UpstreamManifest(content, media_type or "application/octet-stream", actual)

    async def blob_size(self, registry: str, repository: str, digest: Digest) -> int:
        resp = await self.request("HEAD", registry, repository, f"blobs/{digest}", {}, kind="blob")
        async with resp:
            if resp.content_length is None:
                raise self._invalid("blob", "HEAD blob reply without Content-Length")
            return resp.content_length

    async def open_blob(self, registry: str, repository: str, digest: Digest,
                        offset: int = 0, end: int | None = None) -> "UpstreamBlob":
        """Start a blob body from `offset` (to `end`, exclusive, or the end of the
        blob); the returned stream resumes by itself."""
        blob = UpstreamBlob(self, registry, repository, digest, end)
        await blob.start(offset)
        return blob

    # Request machinery --------------------------------------------------

    async def request(self, method: str, registry_name: str, repository: str, path: str,
                      headers: dict[str, str], *, kind: str) -> aiohttp.ClientResponse:
        """One logical request: retries with backoff on 429/5xx/connection errors.
        Returns a 2xx response (caller closes it); raises UpstreamError otherwise."""
        registry = self.config.registry(registry_name)
        url = f"{registry.url}/v2/{repository}/{path}"
        scope = f"repository:{repository}:pull"
        attempts = self.config.upstream_retries
        last: UpstreamError | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self._backoff(attempt, last))
            try:
                resp = await self._send_authorized(method, registry, url, scope, headers)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                reason = "timeout" if isinstance(e, asyncio.TimeoutError) else "connection"
                self.metrics.upstream_errors.labels(kind, reason).inc()
                last = UpstreamError(f"{registry.url}: {reason}: {e or type(e).__name__}",
                                     reason=reason)
                log.warning("upstream %s %s failed (attempt %d/%d): %s", method, url, attempt + 1,
                            attempts, last)
                continue
            self.metrics.upstream_requests.labels(kind, str(resp.status)).inc()
            if 200 <= resp.status < 300:
                return resp
            retry_after = _retry_after(resp.headers.get("Retry-After"))
            resp.release()
            if resp.status in RETRY_STATUSES:
                reason = "throttled" if resp.status == 429 else "server_error"
                self.metrics.upstream_errors.labels(kind, reason).inc()
                last = UpstreamError(f"{registry.url} answered {resp.status} for {path}",
                                     status=resp.status, reason=reason, retry_after=retry_after)
                log.warning("upstream %s %s: %d (attempt %d/%d)", method, url, resp.status,
                            attempt + 1, attempts)
                continue
            reason = "not_found" if resp.status == 404 else "auth" if resp.status in (401, 403) else "status"
            self.metrics.upstream_errors.labels(kind, reason).inc()
            raise UpstreamError(f"{registry.url} answered {resp.status} for {repository}/{path}",
                                status=resp.status, reason=reason)
        assert last is not None
        raise last

    def _backoff(self, attempt: int, last: UpstreamError | None) -> float:
        if last is not None and last.retry_after is not None:
            return min(last.retry_after, MAX_RETRY_AFTER)
        base = self.config.upstream_backoff * (2 ** (attempt - 1))
        return base * (0.5 + random.random())

    async def _send_authorized(self, method: str, registry: Registry, url: str, scope: str,
                               headers: dict[str, str]) -> aiohttp.ClientResponse:
        credentials = registry.credentials()
        auth = self.tokens.get(registry.name, scope)
        resp = await self._send(method, url, headers, auth)
        if resp.status != 401:
            return resp
        challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        resp.release()
        if challenge is None:
            return await self._send(method, url, headers, None)
        token_scope = challenge.params.get("scope", scope)
        lock = self.tokens.lock(registry.name, scope)
        async with lock:
            fresh = self.tokens.get(registry.name, scope)
            if fresh is not None and fresh != auth:
                auth = fresh  # another request fetched a token while we waited
            elif challenge.scheme == "bearer":
                self.metrics.upstream_requests.labels("token", "request").inc()
                auth, lifetime = await fetch_token(self.session, challenge, token_scope, credentials,
                                                   aiohttp.ClientTimeout(total=self._header_timeout))
                self.tokens.put(registry.name, scope, auth, lifetime)
            elif challenge.scheme == "basic" and credentials:
                auth = basic_header(credentials)
                self.tokens.put(registry.name, scope, auth, 3600.0)
            else:
                raise UpstreamError(f"{registry.url} requires {challenge.scheme} auth and no "
                                    f"credentials are configured for {registry.name}",
                                    status=401, reason="auth")
        return await self._send(method, url, headers, auth)

    async def _send(self, method: str, url: str, headers: dict[str, str],
                    auth: str | None) -> aiohttp.ClientResponse:
        """Follow redirects by hand so Authorization never leaves the registry's origin
        (blob storage behind a 307 rejects or leaks it)."""
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            send_headers = dict(headers)
            if auth and _origin(url) == origin:
                send_headers["Authorization"] = auth
            # not asyncio.wait_for: on 3.11 it loses a cancel that races the reply
            # (tracker/waits.py), and the fetch being cancelled would carry on
            async with asyncio.timeout(self._header_timeout):
                resp = await self.session.request(method, url, headers=send_headers,
                                                  allow_redirects=False)
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                url = urljoin(url, resp.headers["Location"])
                resp.release()
                if resp.status == 303:
                    method = "GET"
                continue
            return resp
        raise UpstreamError(f"too many redirects from {origin}", reason="invalid", status=502)

    async def _read_limited(self, resp: aiohttp.ClientResponse, limit: int) -> bytes:
        chunks = bytearray()
        async with asyncio.timeout(self._header_timeout):
            async for chunk in resp.content.iter_any():
                chunks += chunk
                if len(chunks) > limit:
                    raise self._invalid("manifest", "manifest exceeds max_manifest_size")
        return bytes(chunks)

    def _invalid(self, kind: str, message: str) -> UpstreamError:
        self.metrics.upstream_errors.labels(kind, "invalid").inc()
        return UpstreamError(message, reason="invalid", status=502)


class UpstreamBlob:
    """A blob body from upstream that survives stalls and cuts.

    `size` is known once `start` returns (status and length are checked
    first). `chunks()` yields the bytes from the start offset to the end,
    reopening with `Range: bytes=N-` whenever the stream stalls for
    `upstream_stall_timeout` or breaks, and checking that the reopened reply
    really starts at N (an upstream that ignores Range gets its prefix skipped).
    """

    def __init__(self, client: UpstreamClient, registry: str, repository: str, digest: Digest,
                 end: int | None = None) -> None:
        self.client = client
        self.registry = registry
        self.repository = repository
        self.digest = digest
        self.size = -1  # of the whole blob
        self.position = 0
        self._end = end  # exclusive; None: the end of the blob
        self._resp: aiohttp.ClientResponse | None = None
        self._skip = 0

    async def start(self, offset: int = 0) -> None:
        self.position = offset
        await self._open()

    async def _open(self) -> None:
        headers = {"Accept-Encoding": "identity"}
        if self._end is not None:
            headers["Range"] = f"bytes={self.position}-{self._end - 1}"
        elif self.position:
            headers["Range"] = f"bytes={self.position}-"
        resp = await self.client.request("GET", self.registry, self.repository,
                                         f"blobs/{self.digest}", headers, kind="blob")
        try:
            self._skip = self._check_reply(resp)
        except BaseException:
            resp.release()
            raise
        self._resp = resp

    def _check_reply(self, resp: aiohttp.ClientResponse) -> int:
        """Validate status and lengths; returns how many leading bytes to discard."""
        length = resp.content_length
        if resp.status == 206:
            content_range = parse_content_range(resp.headers.get("Content-Range"))
            if content_range is None or content_range[0] != self.position:
                raise self.client._invalid("blob", f"206 with Content-Range "
                                           f"{resp.headers.get('Content-Range')!r} for a request at {self.position}")
            first, last, known_total = content_range
            total = -1 if known_total is None else known_total
            expected_length = last - first + 1
            wanted_last = (self._end if self._end is not None else total) - 1
            if total < 0 or (length is not None and length != expected_length) or last != wanted_last:
                raise self.client._invalid("blob", "206 reply does not cover the requested range")
            skip = 0
        elif resp.status == 200:
            if length is None:
                raise self.client._invalid("blob", "blob reply without Content-Length")
            total = length
            skip = self.position  # upstream ignored our Range: discard what we have
            if self.position:
                log.info("upstream ignored Range for %s; skipping %d bytes", self.digest, skip)
        else:
            raise self.client._invalid("blob", f"unexpected status {resp.status} for a blob")
        if self.size >= 0 and total != self.size:
            raise self.client._invalid("blob", f"blob size changed from {self.size} to {total}")
        self.size = total
        if self._end is not None and self._end > total:
            raise self.client._invalid("blob", f"range end {self._end} beyond blob size {total}")
        return skip

    @property
    def end(self) -> int:
        return self._end if self._end is not None else self.size

    async def chunks(self) -> AsyncIterator[bytes]:
        metrics = self.client.metrics
        stall = self.client.config.upstream_stall_timeout
        failures = 0
        try:
            while self.position < self.end:
                if self._resp is None:
                    if failures >= self.client.config.upstream_retries:
                        raise UpstreamError(f"blob {self.digest} kept failing at byte {self.position}",
                                            reason="stall", status=502)
                    await asyncio.sleep(self.client._backoff(failures, None))
                    await self._open()
                try:
                    async with asyncio.timeout(stall):
                        chunk = await self._resp.content.readany()
                except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as e:
                    reason = "stall" if isinstance(e, asyncio.TimeoutError) else "connection"
                    metrics.upstream_errors.labels("blob", reason).inc()
                    log.warning("upstream blob %s %s at byte %d of %d; resuming", self.digest,
                                reason, self.position, self.size)
                    self._drop()
                    failures += 1
                    continue
                if not chunk:  # EOF before the promised length: a cut connection
                    metrics.upstream_errors.labels("blob", "short_read").inc()
                    log.warning("upstream blob %s ended at byte %d of %d; resuming", self.digest,
                                self.position, self.size)
                    self._drop()
                    failures += 1
                    continue
                metrics.upstream_bytes.labels("blob").inc(len(chunk))
                if self._skip:
                    if len(chunk) <= self._skip:
                        self._skip -= len(chunk)
                        continue
                    chunk = chunk[self._skip:]
                    self._skip = 0
                if self.position + len(chunk) > self.end:
                    if self._end is None or self._resp.status == 206:
                        raise self.client._invalid("blob", "upstream sent more bytes than announced")
                    chunk = chunk[:self.end - self.position]  # a 200 to our Range: stop at the end
                self.position += len(chunk)
                failures = 0
                yield chunk
        finally:
            self._drop()

    def _drop(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None

    async def close(self) -> None:
        self._drop()


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        import time
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
