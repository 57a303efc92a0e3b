"""In-process tracker state: the default backend, and what an agent embeds.

Every method runs without awaiting in the middle of a state change, so on one
event loop each call is atomic without locks — the same guarantee the Redis
backend gets from Lua scripts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping, Sequence

from tracker.backend import Notifier, Timeouts, make_peer, rank_peers, wait_for_version
from tracker.errors import BadRequest, BlobUnknown, Conflict
from tracker.models import (ALL, AnnounceReply, BlobRecord, Holding, LeaseGrant, LeaseRenewal,
                            Node, Peer, SegmentMeta, Stats, check_segments, choose_geometry,
                            info_hash)


@dataclass
class _Blob:
    record: BlobRecord
    touched: float
    leases: dict[int, tuple[str, float]] = field(default_factory=dict)  # segment -> (node, expires)


class MemoryBackend:
    """Dicts and a monotonic clock. `clock` is injectable so tests can step time."""

    name = "memory"

    def __init__(self, timeouts: Timeouts | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeouts = timeouts or Timeouts()
        self._clock = clock
        self._blobs: dict[str, _Blob] = {}
        self._holders: dict[str, dict[str, Holding]] = {}     # digest -> node -> holding
        self._nodes: dict[str, tuple[Node, float]] = {}       # node -> (info, expires)
        self._node_blobs: dict[str, set[str]] = {}
        self._fetchers: dict[str, set[str]] = {}              # digest -> nodes downloading it
        self._node_fetching: dict[str, set[str]] = {}         # node -> digests it downloads
        self._node_leases: dict[str, set[str]] = {}
        self._notifier = Notifier()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    # Blob records -------------------------------------------------------------

    def _blob(self, digest: str, touch: bool = True) -> _Blob | None:
        blob = self._blobs.get(digest)
        now = self._clock()
        if blob is not None and blob.touched + self.timeouts.blob < now:
            del self._blobs[digest]
            return None
        if blob is not None and touch:
            blob.touched = now
        return blob

    def _require(self, digest: str) -> _Blob:
        blob = self._blob(digest)
        if blob is None:
            raise BlobUnknown(f"unknown blob {digest}")
        return blob

    async def register(self, digest: str, size: int, segment_size: int | None = None,
                       piece_size: int | None = None) -> tuple[BlobRecord, bool]:
        seg, piece = choose_geometry(size, segment_size, piece_size)
        blob = self._blob(digest)
        if blob is not None:
            if blob.record.size != size:
                raise Conflict(f"{digest} is registered with size {blob.record.size}, not {size}",
                               code="SIZE_MISMATCH")
            return _copy(blob.record), False
        blob = self._blobs[digest] = _Blob(BlobRecord(digest, size, seg, piece), self._clock())
        return _copy(blob.record), True

    async def get_blob(self, digest: str) -> BlobRecord | None:
        blob = self._blob(digest)
        return _copy(blob.record) if blob else None

    # Leases -------------------------------------------------------------------

    async def claim(self, digest: str, node: str, segments: Sequence[int] | None = None,
                    count: int = 1) -> LeaseGrant:
        blob = self._require(digest)
        record, now, ttl = blob.record, self._clock(), self.timeouts.lease
        want = (check_segments(segments, count=record.segment_count) if segments is not None
                else range(record.segment_count))
        want = [i for i in want if i not in record.segments]
        granted, renewed, reclaimed = [], [], []
        for i in want:                       # first: what the caller already holds
            lease = blob.leases.get(i)
            if lease and lease[0] == node:
                blob.leases[i] = (node, now + ttl)
                granted.append(i)
                renewed.append(i)
        limit = self.timeouts.lease_limit or len(want) + len(blob.leases)
        others = sum(1 for i, (n, exp) in blob.leases.items()
                     if n != node and exp > now and i not in record.segments)
        for i in want:                       # then: free segments, up to count and the limit
            if len(granted) >= count or others + len(granted) >= limit:
                break
            lease = blob.leases.get(i)
            if lease and (lease[0] == node or lease[1] > now):
                continue
            if lease:
                reclaimed.append(i)
            blob.leases[i] = (node, now + ttl)
            granted.append(i)
        if granted:
            self._node_leases.setdefault(node, set()).add(digest)
        taken = set(granted)
        holders = {i: n for i, (n, exp) in blob.leases.items() if exp > now and i not in taken}
        ends = [exp - now for i, (n, exp) in blob.leases.items()
                if n != node and exp > now and i not in record.segments]
        return LeaseGrant(digest, granted, ttl, record.version, renewed, reclaimed, holders,
                          min(ends, default=None))

    async def renew(self, digest: str, node: str, segments: Sequence[int]) -> LeaseRenewal:
        blob = self._require(digest)
        segments = check_segments(segments, count=blob.record.segment_count)
        renewed, lost = [], []
        for i in segments:
            lease = blob.leases.get(i)
            if lease and lease[0] == node and i not in blob.record.segments:
                blob.leases[i] = (node, self._clock() + self.timeouts.lease)
                renewed.append(i)
            else:
                lost.append(i)
        return LeaseRenewal(renewed, lost, self.timeouts.lease)

    async def release(self, digest: str, node: str,
                      segments: Sequence[int] | None = None) -> list[int]:
        blob = self._require(digest)
        if segments is not None:
            segments = check_segments(segments, count=blob.record.segment_count)
        return self._release(blob, node, segments)

    @staticmethod
    def _release(blob: _Blob, node: str, segments: Sequence[int] | None) -> list[int]:
        which = list(blob.leases) if segments is None else segments
        released = [i for i in which if blob.leases.get(i, ("",))[0] == node]
        for i in released:
            del blob.leases[i]
        return sorted(released)

    # Publish / withdraw -------------------------------------------------------

    async def publish(self, digest: str, index: int, node: str, metainfo: bytes) -> BlobRecord:
        blob = self._require(digest)
        record = blob.record
        _check_index(record, index)
        digest_hex = info_hash(metainfo)
        current = record.segments.get(index)
        if current is not None:
            if current.info_hash != digest_hex:
                raise Conflict(f"segment {index} already has different metainfo "
                               f"({current.info_hash}); withdraw it first", code="METAINFO_CONFLICT")
            return _copy(record)
        record.segments[index] = SegmentMeta(index, bytes(metainfo), node, digest_hex)
        record.version += 1
        blob.leases.pop(index, None)
        holders = self._holders.setdefault(digest, {})
        held = holders.get(node, frozenset())
        if held != ALL:
            held = held | {index}
            holders[node] = ALL if len(held) >= record.segment_count else held
        self._node_blobs.setdefault(node, set()).add(digest)
        self._notifier.notify(digest)
        return _copy(record)

    async def withdraw(self, digest: str, index: int, info_hash: str | None = None) -> BlobRecord:
        blob = self._require(digest)
        record = blob.record
        _check_index(record, index)
        current = record.segments.get(index)
        if current is None:
            return _copy(record)
        if info_hash is not None and current.info_hash != info_hash:
            raise Conflict(f"segment {index} is now {current.info_hash}, not {info_hash}",
                           code="INFO_HASH_MISMATCH")
        del record.segments[index]
        record.version += 1
        holders = self._holders.get(digest, {})
        for node, held in list(holders.items()):
            if held == ALL:
                held = frozenset(range(record.segment_count))
            held = held - {index}
            if held:
                holders[node] = held
            else:
                del holders[node]
        self._notifier.notify(digest)
        return _copy(record)

    # Nodes --------------------------------------------------------------------

    async def announce(self, node: Node, blobs: Mapping[str, Holding],
                       removed: Sequence[str] = (), full: bool = False,
                       fetching: Collection[str] = ()) -> AnnounceReply:
        now, ttl = self._clock(), self.timeouts.announce
        previous = self._nodes.get(node.node_id)
        was_live = previous is not None and previous[1] > now
        self._nodes[node.node_id] = (node, now + ttl)
        mine = self._node_blobs.setdefault(node.node_id, set())
        if full:
            for digest in mine - set(blobs):
                self._drop_holding(digest, node.node_id)
            mine.clear()
        for digest, holding in blobs.items():
            if holding == ALL or holding:
                self._holders.setdefault(digest, {})[node.node_id] = holding
                mine.add(digest)
            else:
                self._drop_holding(digest, node.node_id)
        for digest in removed:
            self._drop_holding(digest, node.node_id)
        self._set_fetching(node.node_id, set(fetching))
        return AnnounceReply(ttl, ttl / 2, resync=not was_live and not full)

    def _drop_holding(self, digest: str, node_id: str) -> None:
        holders = self._holders.get(digest)
        if holders is not None:
            holders.pop(node_id, None)
            if not holders:
                del self._holders[digest]
        self._node_blobs.get(node_id, set()).discard(digest)

    def _set_fetching(self, node_id: str, digests: set[str]) -> None:
        previous = self._node_fetching.pop(node_id, set())
        for digest in previous - digests:
            fetchers = self._fetchers.get(digest, set())
            fetchers.discard(node_id)
            if not fetchers:
                self._fetchers.pop(digest, None)
        for digest in digests:
            self._fetchers.setdefault(digest, set()).add(node_id)
        if digests:
            self._node_fetching[node_id] = digests

    async def leave(self, node_id: str) -> bool:
        for digest in self._node_leases.pop(node_id, set()):
            blob = self._blobs.get(digest)
            if blob is not None:
                self._release(blob, node_id, None)
        return self._forget(node_id)

    def _forget(self, node_id: str) -> bool:
        for digest in list(self._node_blobs.pop(node_id, set())):
            self._drop_holding(digest, node_id)
        self._set_fetching(node_id, set())
        return self._nodes.pop(node_id, None) is not None

    async def peers(self, digest: str, node: str | None = None, segment: int | None = None,
                    limit: int = 20, zone: str | None = None, rack: str | None = None) -> list[Peer]:
        blob = self._blob(digest, touch=False)
        count = blob.record.segment_count if blob else None
        if blob is not None and segment is not None:
            _check_index(blob.record, segment)
        now = self._clock()
        me = self._nodes.get(node) if node else None
        if me is not None:
            zone = zone if zone is not None else me[0].labels.get("zone")
            rack = rack if rack is not None else me[0].labels.get("rack")
        found = []
        holders = self._holders.get(digest, {})
        fetchers = self._fetchers.get(digest, set())
        for holder in holders.keys() | fetchers:
            info = self._nodes.get(holder)
            if holder == node or info is None or info[1] <= now:
                continue
            peer = make_peer(info[0], holders.get(holder, frozenset()), count, segment,
                             holder in fetchers)
            if peer is not None:
                found.append(peer)
        return rank_peers(found, limit, zone, rack, segment=segment)

    # Long-poll, housekeeping ----------------------------------------------------

    async def wait(self, digest: str, since: int, timeout: float) -> BlobRecord:
        return await wait_for_version(self._notifier, digest, since, timeout, self.get_blob)

    async def sweep(self) -> None:
        now = self._clock()
        for node_id, (_, expires) in list(self._nodes.items()):
            if expires <= now:
                self._forget(node_id)
                self._node_leases.pop(node_id, None)
        for node_id in [n for n in self._node_blobs if n not in self._nodes]:
            self._forget(node_id)           # published but never announced
        for digest, blob in list(self._blobs.items()):
            if blob.touched + self.timeouts.blob < now:
                del self._blobs[digest]

    async def stats(self) -> Stats:
        now = self._clock()
        live = sum(1 for _, expires in self._nodes.values() if expires > now)
        blobs = sum(1 for b in self._blobs.values() if b.touched + self.timeouts.blob >= now)
        return Stats(blobs=blobs, nodes=live)


def _check_index(record: BlobRecord, index: int) -> None:
    if not 0 <= index < record.segment_count:
        raise BadRequest(f"segment {index} out of range ({record.digest} has "
                         f"{record.segment_count} segments)")


def _copy(record: BlobRecord) -> BlobRecord:
    """Callers get a snapshot: SegmentMeta is frozen, so a shallow dict copy suffices."""
    return BlobRecord(record.digest, record.size, record.segment_size, record.piece_size,
                      record.version, dict(record.segments))
