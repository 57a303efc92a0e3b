"""Redis backend: several tracker processes over one Redis behave as one tracker.

Every state change is one Lua script (see redis_scripts.py for the key
layout and why). Long-polls: each tracker process holds one pattern
subscription to every blob's event channel, so a publish through tracker A
wakes the waiters on tracker B; waiters woken by the same event share one
read of the record.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from typing import Any, Collection, Mapping, Sequence

import msgpack
import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError, ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tracker import redis_scripts as lua
from tracker.backend import (Notifier, Timeouts, decode_holding, encode_holding, make_peer,
                             rank_peers, wait_for_version)
from tracker.errors import BackendUnavailable, BadRequest, BlobUnknown, Conflict
from tracker.models import (AnnounceReply, BlobRecord, Holding, LeaseGrant, LeaseRenewal, Node,
                            Peer, SegmentMeta, Stats, check_segments, choose_geometry, info_hash)
from tracker.waits import wait_event

log = logging.getLogger(__name__)
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)


def _translated(method):
    """Redis unreachable → BackendUnavailable (HTTP 503), which the client treats as 'tracker down'."""
    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except _UNAVAILABLE as e:
            raise BackendUnavailable(f"redis: {e}") from e
    return wrapper


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _raise_range(result: Any) -> None:
    if isinstance(result, list) and result and result[0] == -1:
        raise BadRequest(f"segment {result[1]} out of range (blob has {result[2]} segments)")


class RedisBackend:
    """`url` like redis://127.0.0.1:6379/0; `prefix` namespaces the keys (tests use one per test)."""

    name = "redis"

    def __init__(self, url: str, timeouts: Timeouts | None = None, prefix: str = "fleetp2p",
                 connect_timeout: float = 5.0) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", prefix):
            raise ValueError(f"invalid redis key prefix {prefix!r}")
        self.timeouts = timeouts or Timeouts()
        self._url = url
        self._prefix = prefix
        self._connect_timeout = connect_timeout
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._notifier = Notifier()
        self._listener: asyncio.Task | None = None
        self._subscribed = asyncio.Event()
        self._shared_reads: dict[tuple[str, asyncio.Event], asyncio.Future] = {}

    # Lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        if self._redis is not None:
            return
        self._redis = aioredis.from_url(self._url, decode_responses=False,
                                        socket_connect_timeout=self._connect_timeout,
                                        socket_keepalive=True, health_check_interval=10)
        for name in ("REGISTER", "GET", "CLAIM", "RENEW", "RELEASE", "PUBLISH", "WITHDRAW",
                     "ANNOUNCE", "LEAVE", "PEERS", "SWEEP", "STATS"):
            self._scripts[name] = self._redis.register_script(getattr(lua, name))
        self._listener = asyncio.create_task(self._listen(), name="tracker-redis-events")
        if not await wait_event(self._subscribed, self._connect_timeout):
            await self.close()
            raise BackendUnavailable(f"redis at {self._url} unreachable") from None

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @_translated
    async def ping(self) -> None:
        await self._redis.ping()

    async def _listen(self) -> None:
        """Keep one pattern subscription alive; after any gap wake every waiter so they re-read."""
        pattern = f"{self._prefix}:ev:*"
        skip = len(self._prefix) + 4
        backoff = 0.1
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.psubscribe(pattern)
                while True:
                    msg = await pubsub.get_message(timeout=self._connect_timeout)
                    if msg is None:
                        raise RedisTimeoutError("no psubscribe confirmation")
                    if msg["type"] == "psubscribe":
                        break
                self._subscribed.set()
                self._notifier.notify_all()
                backoff, silent = 0.1, 0
                while True:     # a half-open TCP connection never errors: ping when idle
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10.0)
                    if msg is None:
                        silent += 1
                        if silent > 2:
                            raise RedisTimeoutError("event subscription stopped answering pings")
                        await pubsub.ping()
                        continue
                    silent = 0
                    if msg["type"] == "pmessage":
                        self._notifier.notify(msg["channel"][skip:].decode())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure: reconnect
                if self._subscribed.is_set():
                    log.warning("tracker: redis event subscription lost: %s", e)
            finally:
                self._subscribed.clear()
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _run(self, name: str, *args: Any) -> Any:
        return await self._scripts[name](keys=[], args=[self._prefix, *args])

    # Blob records ---------------------------------------------------------------

    @_translated
    async def register(self, digest: str, size: int, segment_size: int | None = None,
                       piece_size: int | None = None) -> tuple[BlobRecord, bool]:
        seg, piece = choose_geometry(size, segment_size, piece_size)
        created = await self._run("REGISTER", digest, size, seg, piece, _ms(self.timeouts.blob))
        record = await self.get_blob(digest)
        if record is None:            # expired in between: vanishingly rare, but say so
            raise BackendUnavailable(f"record for {digest} vanished while registering")
        if record.size != size:
            raise Conflict(f"{digest} is registered with size {record.size}, not {size}",
                           code="SIZE_MISMATCH")
        return record, bool(created)

    @_translated
    async def get_blob(self, digest: str) -> BlobRecord | None:
        flat = await self._run("GET", digest, _ms(self.timeouts.blob))
        if not flat:
            return None
        fields = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
        record = BlobRecord(digest, int(fields["size"]), int(fields["seg"]), int(fields["piece"]),
                            int(fields["ver"]))
        for key, value in fields.items():
            if key.startswith("h"):
                i = int(key[1:])
                record.segments[i] = SegmentMeta(i, fields[f"m{i}"], fields[f"n{i}"].decode(),
                                                 value.decode())
        return record

    async def _read_after_wake(self, digest: str, event: asyncio.Event) -> BlobRecord | None:
        """One record read shared by every waiter the same event woke (all started after it fired)."""
        key = (digest, event)
        future = self._shared_reads.get(key)
        if future is None:
            future = asyncio.ensure_future(self.get_blob(digest))
            self._shared_reads[key] = future
            future.add_done_callback(lambda f: (self._shared_reads.pop(key, None),
                                                f.cancelled() or f.exception()))
        return await asyncio.shield(future)

    # Leases ---------------------------------------------------------------------

    @_translated
    async def claim(self, digest: str, node: str, segments: Sequence[int] | None = None,
                    count: int = 1) -> LeaseGrant:
        want = "*" if segments is None else ",".join(map(str, check_segments(segments)))
        r = await self._run("CLAIM", digest, node, _ms(self.timeouts.lease), count,
                            _ms(self.timeouts.blob), want, self.timeouts.lease_limit)
        self._check(r, digest)
        _, granted, renewed, reclaimed, holders, version, soonest_ms = r
        return LeaseGrant(digest, list(granted), self.timeouts.lease, int(version), list(renewed),
                          list(reclaimed), {int(i): h.decode() for i, h in holders},
                          None if soonest_ms < 0 else soonest_ms / 1000)

    @_translated
    async def renew(self, digest: str, node: str, segments: Sequence[int]) -> LeaseRenewal:
        segs = ",".join(map(str, check_segments(segments)))
        r = await self._run("RENEW", digest, node, _ms(self.timeouts.lease), segs)
        self._check(r, digest)
        return LeaseRenewal(list(r[1]), list(r[2]), self.timeouts.lease)

    @_translated
    async def release(self, digest: str, node: str,
                      segments: Sequence[int] | None = None) -> list[int]:
        which = "*" if segments is None else ",".join(map(str, check_segments(segments)))
        r = await self._run("RELEASE", digest, node, which)
        self._check(r, digest)
        return sorted(r[1])

    @staticmethod
    def _check(result: Any, digest: str) -> None:
        if result is None:
            raise BlobUnknown(f"unknown blob {digest}")
        _raise_range(result)

    # Publish / withdraw ---------------------------------------------------------

    @_translated
    async def publish(self, digest: str, index: int, node: str, metainfo: bytes) -> BlobRecord:
        hexdigest = info_hash(metainfo)
        r = await self._run("PUBLISH", digest, index, node, bytes(metainfo), hexdigest,
                            _ms(self.timeouts.blob), _ms(self.timeouts.announce))
        self._check(r, digest)
        if r[0] == 3:
            raise Conflict(f"segment {index} already has different metainfo ({r[1].decode()}); "
                           "withdraw it first", code="METAINFO_CONFLICT")
        return await self._record(digest)

    @_translated
    async def withdraw(self, digest: str, index: int, info_hash: str | None = None) -> BlobRecord:
        r = await self._run("WITHDRAW", digest, index, info_hash or "")
        self._check(r, digest)
        if r[0] == 3:
            raise Conflict(f"segment {index} is now {r[1].decode()}, not {info_hash}",
                           code="INFO_HASH_MISMATCH")
        return await self._record(digest)

    async def _record(self, digest: str) -> BlobRecord:
        record = await self.get_blob(digest)
        if record is None:
            raise BlobUnknown(f"unknown blob {digest}")
        return record

    # Nodes ----------------------------------------------------------------------

    @_translated
    async def announce(self, node: Node, blobs: Mapping[str, Holding],
                       removed: Sequence[str] = (), full: bool = False,
                       fetching: Collection[str] = ()) -> AnnounceReply:
        ttl = self.timeouts.announce
        args: list[Any] = [node.node_id, msgpack.packb(node.to_wire(), use_bin_type=True),
                           _ms(ttl), "1" if full else "0", len(blobs), len(removed)]
        for digest, holding in blobs.items():
            args += [digest, encode_holding(holding)]
        args += [*removed, *fetching]
        resync = await self._run("ANNOUNCE", *args)
        return AnnounceReply(ttl, ttl / 2, resync=bool(resync))

    @_translated
    async def leave(self, node_id: str) -> bool:
        return bool(await self._run("LEAVE", node_id))

    @_translated
    async def peers(self, digest: str, node: str | None = None, segment: int | None = None,
                    limit: int = 20, zone: str | None = None, rack: str | None = None) -> list[Peer]:
        r = await self._run("PEERS", digest, node or "", -1 if segment is None else segment)
        me, count = r[0], int(r[1])
        count = None if count < 0 else count
        if count is not None and segment is not None and segment >= count:
            raise BadRequest(f"segment {segment} out of range (blob has {count} segments)")
        if me:
            labels = msgpack.unpackb(me, raw=False).get("labels") or {}
            zone = zone if zone is not None else labels.get("zone")
            rack = rack if rack is not None else labels.get("rack")
        found = []
        for i in range(2, len(r), 4):
            info = Node(**_node_fields(msgpack.unpackb(r[i + 3], raw=False)))
            peer = make_peer(info, decode_holding(r[i + 1].decode()), count, segment,
                             r[i + 2] == b"1")
            if peer is not None:
                found.append(peer)
        return rank_peers(found, limit, zone, rack, segment=segment)

    # Long-poll, housekeeping ----------------------------------------------------

    async def wait(self, digest: str, since: int, timeout: float) -> BlobRecord:
        def poll() -> float | None:       # while unsubscribed, wake-ups can be lost: re-read
            return None if self._subscribed.is_set() else 1.0
        return await wait_for_version(self._notifier, digest, since, timeout, self.get_blob,
                                      self._read_after_wake, poll)

    @_translated
    async def sweep(self) -> None:
        while await self._run("SWEEP", _ms(self.timeouts.blob), 500) >= 500:
            pass

    @_translated
    async def stats(self) -> Stats:
        nodes, blobs = await self._run("STATS", _ms(self.timeouts.blob))
        return Stats(blobs=int(blobs), nodes=int(nodes))


def _node_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    return {"node_id": d["node"], "host": d["host"], "port": d["port"], "http": d.get("http"),
            "labels": d.get("labels") or {}}
