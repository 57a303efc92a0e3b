"""The storage contract every tracker backend fulfils, and helpers both share.

Two implementations: `MemoryBackend` (one process, the default, and what an
agent embeds) and `RedisBackend` (several stateless tracker processes over
one Redis act as one tracker). The test-suite in tests/tracker/test_backend.py
runs against both, so the semantics below are the specification.

Times are seconds (floats) at this interface; TTLs are the backend's own
configuration, not the caller's choice, so a misbehaving agent cannot park a
lease forever.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Collection, Mapping, Protocol, Sequence

from tracker.errors import BlobUnknown
from tracker.models import (AnnounceReply, BlobRecord, Holding, LeaseGrant, LeaseRenewal, Node,
                            Peer, Stats)
from tracker.waits import wait_event


@dataclass(frozen=True)
class Timeouts:
    """TTLs shared by both backends.

    lease: a segment lease lives this long unless renewed — short, so a dead
    fetcher's segment goes to the next claimer quickly.
    announce: a node is live this long after its last announce.
    blob: a blob record (and its metainfo) is forgotten this long after its
    last use, so the tracker does not grow forever.
    lease_limit: at most this many live leases per blob (0: no limit). Every
    node must receive the whole blob over its own link anyway, so fetching
    more segments from upstream at once than upstream rate / node link rate
    only makes them all arrive late together; segments leased a few at a
    time are published early and spread while the next ones arrive.
    """

    lease: float = 15.0
    announce: float = 30.0
    blob: float = 7 * 24 * 3600.0
    lease_limit: int = 1


class Backend(Protocol):
    """Tracker state. Every method raises `tracker.errors.ApiError` subclasses on bad input/state."""

    name: str
    timeouts: Timeouts

    async def start(self) -> None:
        """Connect / start background work; called once before use."""

    async def close(self) -> None:
        """Release connections; wakes no one (the server handles its own shutdown)."""

    async def ping(self) -> None:
        """Raise `BackendUnavailable` if the storage cannot be reached."""

    async def register(self, digest: str, size: int, segment_size: int | None = None,
                       piece_size: int | None = None) -> tuple[BlobRecord, bool]:
        """Create the record if absent (first writer chooses the geometry); return it and whether
        this call created it. A different `size` for a known digest is a `Conflict`."""

    async def get_blob(self, digest: str) -> BlobRecord | None:
        """The record, or None."""

    async def claim(self, digest: str, node: str, segments: Sequence[int] | None = None,
                    count: int = 1) -> LeaseGrant:
        """Lease up to `count` unpublished, unleased segments (from `segments`, in that order, or all
        in index order). Leases the caller already holds on wanted segments are renewed and count."""

    async def renew(self, digest: str, node: str, segments: Sequence[int]) -> LeaseRenewal:
        """Extend the caller's leases; a lease still naming the caller counts even if its TTL has
        passed, as long as no one else took it (a slow holder keeps its progress)."""

    async def release(self, digest: str, node: str,
                      segments: Sequence[int] | None = None) -> list[int]:
        """Drop the caller's leases (all of them on this blob if `segments` is None)."""

    async def publish(self, digest: str, index: int, node: str, metainfo: bytes) -> BlobRecord:
        """Store a segment's metainfo, clear its lease, add it to the publisher's holdings, wake
        waiters. Publishing identical bytes again is a no-op; different bytes are a `Conflict`."""

    async def withdraw(self, digest: str, index: int, info_hash: str | None = None) -> BlobRecord:
        """Remove a segment's metainfo and that segment from every holder. With `info_hash`, only
        if it is still the published one (`Conflict` otherwise). Unpublished: unchanged record."""

    async def announce(self, node: Node, blobs: Mapping[str, Holding],
                       removed: Sequence[str] = (), full: bool = False,
                       fetching: Collection[str] = ()) -> AnnounceReply:
        """Refresh liveness and set holdings per digest (an empty set drops the digest). `full`
        replaces every holding of the node; otherwise holdings not mentioned are kept.
        `fetching` always replaces the node's set of blobs it is downloading: such a node is
        a swarm peer for every segment of them (libtorrent trades pieces between
        downloaders), so it is listed by `peers` after the holders."""

    async def leave(self, node_id: str) -> bool:
        """Forget a node, its holdings and its leases at once; True if it was known."""

    async def peers(self, digest: str, node: str | None = None, segment: int | None = None,
                    limit: int = 20, zone: str | None = None, rack: str | None = None) -> list[Peer]:
        """A random sample of live holders except `node`, ranked by `rank_peers`. zone/rack default
        to the caller's announced labels."""

    async def wait(self, digest: str, since: int, timeout: float) -> BlobRecord:
        """Return the record once its version exceeds `since`, or at timeout unchanged."""

    async def sweep(self) -> None:
        """Drop dead nodes' holdings and forgotten blobs; the server calls it every few seconds."""

    async def stats(self) -> Stats:
        """Counts for the metrics gauges."""


def rank_peers(candidates: list[Peer], limit: int, zone: str | None, rack: str | None,
               rng: random.Random | None = None, segment: int | None = None) -> list[Peer]:
    """Shuffle, then stable-sort: holders of `segment` (of anything, without one) before
    mere downloaders, then same zone, then same rack (within that zone), then complete
    holders, then partial ones.

    Shuffling first spreads load: without it every node would ask the same
    first few holders. Topology comes before completeness because cross-zone
    bytes cost money and latency while a partial holder next door still
    serves the segments it has.
    """
    pool = list(candidates)
    (rng or random).shuffle(pool)

    def key(p: Peer) -> tuple[bool, bool, bool, bool, bool]:
        holds = p.has(segment) if segment is not None else p.complete or bool(p.segments)
        same_zone = zone is not None and p.labels.get("zone") == zone
        same_rack = (rack is not None and p.labels.get("rack") == rack
                     and (zone is None or same_zone))
        return (not holds, not same_zone, not same_rack, not p.complete, not p.segments)

    pool.sort(key=key)
    return pool[:limit]


def encode_holding(holding: Holding) -> str:
    """Compact storage form: "*" for all, else sorted comma-separated indexes ("" = nothing)."""
    if holding == "all":
        return "*"
    return ",".join(map(str, sorted(holding)))


def decode_holding(text: str) -> Holding:
    if text == "*":
        return "all"
    return frozenset(int(x) for x in text.split(",") if x)


class Notifier:
    """Wake-ups per key for long-polls, without a lost-wakeup race.

    A waiter takes `event(key)` *before* reading the state it compares; a
    `notify(key)` between that read and the wait has already set the event,
    so the wait returns at once and the waiter reads again. Events are
    reference-counted so keys nobody waits on cost nothing.
    """

    def __init__(self) -> None:
        self._slots: dict[str, list] = {}   # key -> [event, refs]

    def acquire(self, key: str) -> asyncio.Event:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = [asyncio.Event(), 0]
        slot[1] += 1
        return slot[0]

    def release(self, key: str, event: asyncio.Event) -> None:
        slot = self._slots.get(key)
        if slot is not None and slot[0] is event:
            slot[1] -= 1
            if slot[1] <= 0:
                del self._slots[key]

    def notify(self, key: str) -> None:
        slot = self._slots.pop(key, None)
        if slot is not None:
            slot[0].set()

    def notify_all(self) -> None:
        slots, self._slots = self._slots, {}
        for event, _ in slots.values():
            event.set()


async def wait_for_version(notifier: Notifier, digest: str, since: int, timeout: float,
                           read, read_after_wake=None, poll=None) -> BlobRecord:
    """The long-poll loop both backends use.

    read(digest) fetches the record; read_after_wake(digest, event), if given,
    may share one fetch among every waiter woken by the same event (the Redis
    backend does, so a publish does not cost one Redis read per waiter);
    poll() returns a re-read interval when wake-ups may be lost (Redis pub/sub
    reconnecting), else None.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    event = notifier.acquire(digest)
    try:
        record = await read(digest)
        while True:
            if record is None:
                raise BlobUnknown(f"unknown blob {digest}")
            remaining = deadline - loop.time()
            if record.version > since or remaining <= 0:
                return record
            interval = poll() if poll is not None else None
            if not await wait_event(event, min(remaining, interval or remaining)):
                if loop.time() >= deadline:
                    return record
            fired = event
            notifier.release(digest, event)
            event = notifier.acquire(digest)   # before the read: no lost wake-up
            if fired.is_set() and read_after_wake is not None:
                record = await read_after_wake(digest, fired)
            else:
                record = await read(digest)
    finally:
        notifier.release(digest, event)


def make_peer(node: Node, holding: Holding, segment_count: int | None,
              segment: int | None, fetching: bool = False) -> Peer | None:
    """A Peer for the answer, or None if it neither holds what was asked nor downloads the blob."""
    if holding == "all":
        return Peer(node.node_id, node.host, node.port, node.http, dict(node.labels), True)
    held = sorted(i for i in holding if segment_count is None or i < segment_count)
    if not fetching and (not held or (segment is not None and segment not in held)):
        return None
    return Peer(node.node_id, node.host, node.port, node.http, dict(node.labels), False,
                tuple(held), fetching)
