"""Telling the tracker what this node holds.

Holdings change in bursts (every segment a cold fetch completes), and a
waiting peer can only be found once announced, so changes are sent at once,
coalesced, as incremental announces; a full announce goes at start, after
the tracker lost us (`resync`), and after any failure.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from fleetp2p.metrics import Metrics
from fleetp2p.peering.timed import timed
from tracker.client import TrackerClient
from tracker.errors import TrackerError, TrackerUnavailable
from tracker.models import Node
from tracker.waits import wait_event

log = logging.getLogger(__name__)

Holding = Literal["all"] | set[int]
DEFAULT_INTERVAL = 10.0
RETRY_INTERVAL = 2.0


class Announcer:
    def __init__(self, tracker: TrackerClient, node: Node, metrics: Metrics) -> None:
        self.tracker = tracker
        self.node = node
        self.metrics = metrics
        self.holdings: dict[str, Holding] = {}
        self.fetching: set[str] = set()  # sent whole with every announce
        self._changed: set[str] = set()
        self._removed: set[str] = set()
        self._full = True
        self._interval = DEFAULT_INTERVAL
        self._wake = asyncio.Event()
        self.reachable = False

    def hold_segment(self, digest: str, index: int) -> None:
        holding = self.holdings.setdefault(digest, set())
        if holding != "all":
            holding.add(index)
            self._mark(digest)

    def hold_all(self, digest: str) -> None:
        self.holdings[digest] = "all"
        self.fetching.discard(digest)
        self._mark(digest)

    def drop(self, digest: str) -> None:
        if digest in self.fetching:
            self.fetching.discard(digest)
            self._wake.set()
        if self.holdings.pop(digest, None) is not None:
            self._changed.discard(digest)
            self._removed.add(digest)
            self._wake.set()

    async def join_swarm(self, digest: str) -> None:
        """Announce that this node downloads `digest`, and return once the tracker
        knows (or could not be told). Downloaders trade pieces with each other, so
        each must be findable: a node that announces before it asks for peers is
        seen by every node that asks after it, and sees every node that announced
        before — so any two simultaneous downloaders are joined by one of them."""
        self.fetching.add(digest)
        await self.announce_once()

    def _mark(self, digest: str) -> None:
        self._removed.discard(digest)
        self._changed.add(digest)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await wait_event(self._wake, self._interval)
            self._wake.clear()
            await self.announce_once()

    async def announce_once(self) -> None:
        full = self._full
        changed, removed = self._changed, self._removed
        self._changed, self._removed = set(), set()
        blobs = self.holdings if full else {d: self.holdings[d] for d in changed if d in self.holdings}
        try:
            reply = await timed(self.metrics, "announce", lambda: self.tracker.announce(
                self.node, blobs, removed=() if full else removed, full=full,
                fetching=self.fetching))
        except (TrackerUnavailable, TrackerError) as e:
            if self.reachable:
                log.warning("tracker announce failed: %s", e)
            self.reachable = False
            self._full = True
            self._interval = RETRY_INTERVAL
            return
        if not self.reachable:
            log.info("tracker reachable; announced %d blobs", len(self.holdings) if full else len(blobs))
        self.reachable = True
        self._full = bool(reply.resync)
        if reply.resync:
            self._wake.set()
        self._interval = max(1.0, min(float(reply.interval), 60.0))

    async def leave(self) -> None:
        try:
            await self.tracker.leave(self.node.node_id)
        except (TrackerUnavailable, TrackerError):
            pass
