"""Async client the agent uses to talk to a tracker.

One aiohttp session with keep-alive (or the caller's), short timeouts, and
two kinds of failure: `TrackerUnavailable` (connection, timeout, 5xx,
garbage — fall back to upstream) and `TrackerError` subclasses (4xx — the
tracker understood and said no). Every method returns the dataclasses of
tracker.models.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Iterable, Literal, Mapping, TypeVar

import aiohttp
import msgpack

from tracker.errors import (TrackerConflict, TrackerError, TrackerNotFound, TrackerUnauthorized,
                            TrackerUnavailable)
from tracker.models import (AnnounceReply, BlobRecord, LeaseGrant, LeaseRenewal, Node, Peer)

CONTENT_TYPE = "application/msgpack"
_BY_STATUS = {401: TrackerUnauthorized, 404: TrackerNotFound, 409: TrackerConflict}
T = TypeVar("T")


def _parse(build: Callable[[Any], T], payload: Any) -> T:
    """A 2xx whose body does not fit the model is as useless as no answer (version skew, proxy)."""
    try:
        return build(payload)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TrackerUnavailable(f"tracker: malformed reply: {type(e).__name__}: {e}") from e


class TrackerClient:
    """`base_url` is where the app is mounted (http://tracker:7070 or http://agent:5050/tracker)."""

    def __init__(self, base_url: str, token: str | None = None,
                 session: aiohttp.ClientSession | None = None, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session = session
        self._own_session = session is None
        self._headers = {"Accept": CONTENT_TYPE}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"

    async def __aenter__(self) -> "TrackerClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector)
            self._own_session = True
        return self._session

    async def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None,
                    params: Mapping[str, Any] | None = None,
                    timeout: float | None = None) -> tuple[int, Any]:
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = msgpack.packb(body, use_bin_type=True)
            headers["Content-Type"] = CONTENT_TYPE
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        url = self.base_url + path
        try:
            async with self._get_session().request(
                    method, url, data=data, params=query, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout or self.timeout)) as response:
                status, raw = response.status, await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise TrackerUnavailable(f"tracker {method} {url}: {type(e).__name__}: {e}") from e
        try:
            payload = msgpack.unpackb(raw, raw=False, strict_map_key=False) if raw else {}
        except Exception:  # noqa: BLE001 - msgpack raises many types
            payload = None
        if status >= 500 or payload is None or not isinstance(payload, dict):
            message = payload.get("message") if isinstance(payload, dict) else raw[:200]
            raise TrackerUnavailable(f"tracker {method} {url}: HTTP {status}: {message!r}")
        if status >= 400:
            cls = _BY_STATUS.get(status, TrackerError)
            raise cls(status, str(payload.get("error", "HTTP_ERROR")), str(payload.get("message", "")))
        return status, payload

    @staticmethod
    def _blob_path(digest: str) -> str:
        return f"/v1/blobs/{digest}"

    # API ------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """Tracker and backend reachable (authenticated)."""
        return (await self._call("GET", "/v1/health"))[1]

    async def register(self, digest: str, size: int, *, segment_size: int | None = None,
                       piece_size: int | None = None) -> BlobRecord:
        """Create the record, or get the existing one (first registrar's geometry wins)."""
        body: dict[str, Any] = {"size": size}
        if segment_size is not None:
            body["segment_size"] = segment_size
        if piece_size is not None:
            body["piece_size"] = piece_size
        return _parse(BlobRecord.from_wire, (await self._call("PUT", self._blob_path(digest), body))[1])

    async def get_blob(self, digest: str) -> BlobRecord | None:
        """The record, or None when the tracker does not know the digest."""
        try:
            return _parse(BlobRecord.from_wire, (await self._call("GET", self._blob_path(digest)))[1])
        except TrackerNotFound:
            return None

    async def claim(self, digest: str, node: str, *, segments: Iterable[int] | None = None,
                    count: int = 1) -> LeaseGrant:
        body: dict[str, Any] = {"node": node, "count": count}
        if segments is not None:
            body["segments"] = list(segments)
        path = self._blob_path(digest) + "/leases"
        return _parse(LeaseGrant.from_wire, (await self._call("POST", path, body))[1])

    async def renew(self, digest: str, node: str, segments: Iterable[int]) -> LeaseRenewal:
        path = self._blob_path(digest) + "/leases/renew"
        body = {"node": node, "segments": list(segments)}
        return _parse(LeaseRenewal.from_wire, (await self._call("POST", path, body))[1])

    async def release(self, digest: str, node: str,
                      segments: Iterable[int] | None = None) -> list[int]:
        body: dict[str, Any] = {"node": node}
        if segments is not None:
            body["segments"] = list(segments)
        path = self._blob_path(digest) + "/leases/release"
        return _parse(lambda d: list(d["released"]), (await self._call("POST", path, body))[1])

    async def publish(self, digest: str, index: int, node: str, metainfo: bytes) -> BlobRecord:
        path = f"{self._blob_path(digest)}/segments/{index}"
        body = {"node": node, "metainfo": bytes(metainfo)}
        return _parse(BlobRecord.from_wire, (await self._call("PUT", path, body))[1])

    async def withdraw(self, digest: str, index: int, *, info_hash: str | None = None) -> BlobRecord:
        """Report bad metainfo; with info_hash, only if that is still what is published."""
        path = f"{self._blob_path(digest)}/segments/{index}"
        params = {"info_hash": info_hash}
        return _parse(BlobRecord.from_wire, (await self._call("DELETE", path, params=params))[1])

    async def announce(self, node: Node,
                       blobs: Mapping[str, Literal["all"] | Iterable[int]] | None = None, *,
                       removed: Iterable[str] = (), full: bool = False,
                       fetching: Iterable[str] = ()) -> AnnounceReply:
        """Heartbeat plus holdings. Send `full=True` at start and whenever the reply says `resync`.
        `fetching` is every blob the node downloads now (each announce replaces it)."""
        body = node.to_wire()
        body["blobs"] = {d: h if h == "all" else sorted(h) for d, h in (blobs or {}).items()}
        body["removed"] = list(removed)
        body["full"] = full
        body["fetching"] = sorted(fetching)
        return _parse(AnnounceReply.from_wire, (await self._call("POST", "/v1/announce", body))[1])

    async def leave(self, node_id: str) -> bool:
        """Graceful shutdown: forget this node, its holdings and leases now rather than at TTL."""
        payload = (await self._call("DELETE", f"/v1/nodes/{node_id}"))[1]
        return _parse(lambda d: bool(d["removed"]), payload)

    async def peers(self, digest: str, *, node: str | None = None, segment: int | None = None,
                    limit: int | None = None, zone: str | None = None,
                    rack: str | None = None) -> list[Peer]:
        params = {"node": node, "segment": segment, "limit": limit, "zone": zone, "rack": rack}
        payload = (await self._call("GET", self._blob_path(digest) + "/peers", params=params))[1]
        return _parse(lambda d: [Peer.from_wire(p) for p in d["peers"]], payload)

    async def wait(self, digest: str, since: int, timeout: float = 30.0) -> BlobRecord:
        """Long-poll until the record's version exceeds `since` (or timeout: unchanged record)."""
        path = self._blob_path(digest) + "/wait"
        params = {"since": since, "timeout": timeout}
        status, payload = await self._call("GET", path, params=params,
                                           timeout=timeout + self.timeout)
        return _parse(BlobRecord.from_wire, payload)
