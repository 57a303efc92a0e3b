"""While a segment's holders are few, each of its pieces leaves them once.

A segment that one node holds and fifteen download is bound by that node's
uplink. BitTorrent's rarest-first cannot see what other downloaders have
*requested*, so several of them ask the holder for the same piece at once:
on the 16-node bench the lone seed sent 2.2–2.5 copies of the blob before
its last piece had left it once, and the fleet waited for that piece.
(libtorrent's super-seeding is meant for this, but in 2.0/2.1 it offers the
first piece only after 10 s: the offer made during the handshake is dropped.)

So while holders are scarce the downloaders split the segment's pieces among
themselves by rendezvous hashing (a piece belongs to the member with the
highest hash of piece and member id: every member computes the same owner,
and a newcomer takes pieces from others without reshuffling the rest). Each
fetches its share from the holders over HTTP and hands it to libtorrent,
which checks it against the published piece hash; BitTorrent runs among the
downloaders only, so every piece leaves a holder about once and then spreads
at the downloaders' combined rate. A member whose share is done, or whose
reads failed (holder gone, nobody answering), connects to the holders like
any peer once the segment stops progressing: pieces a vanished member never
fetched still arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import logging
from collections.abc import AsyncIterator, Set as AbstractSet

from fleetp2p.fetch.download import Download
from fleetp2p.peering.holds import Holds
from fleetp2p.peering.peerhttp import PeerReader
from fleetp2p.store import Geometry
from fleetp2p.swarm import Swarm

log = logging.getLogger(__name__)

# Stripe while a segment has at least as many downloaders as holders: then the
# holders' uplinks are the bottleneck. A lone downloader stripes too (its share
# is everything): it would otherwise open BitTorrent connections to the holder
# before the others show up, and their flows crowd out everyone's first piece.
STRIPE_RATIO = 1
CONCURRENT_READS = 2  # per blob: enough to keep a holder busy, little memory on its side


class Slots:
    """A semaphore that lets the lowest-numbered waiter in first.

    This orders the stripes of a blob's segments only loosely. Each segment
    reads its share one piece at a time, so a freed slot goes to another
    segment's waiting read, and the earliest segments all advance together.
    On the 16-node bench (8 segments, 2 slots), the stripe reads of six of
    the eight segments began within 0.5 s; segment 0's ended at 13 s,
    segment 7's at 26 s. A strict queue (2 readers per blob, always taking
    the lowest piece) made the segments complete in order: clients had a
    quarter of the blob after about 10 s instead of 14-19 s. But the last
    copy arrived later: 30.8-32.5 s in 4 runs, against 28.9-31.4 s in 9 runs
    with the loose order on the same day. So the loose order stays. Why was
    not measured; perhaps the downloaders' exchange keeps more connections
    busy when many segments are in play."""

    def __init__(self, count: int) -> None:
        self._free = count
        self._waiting: list[tuple[int, int, asyncio.Future]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            future = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (priority, next(self._order), future))
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._release()  # granted as we were cancelled: pass it on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1


def scarce(holders: int, downloaders: int) -> bool:
    """`downloaders` counts this node too."""
    return holders > 0 and downloaders >= STRIPE_RATIO * holders


def owner(digest: str, index: int, piece: int, members: AbstractSet[str]) -> str:
    def score(member: str) -> bytes:
        return hashlib.blake2b(f"{digest}/{index}/{piece}/{member}".encode(), digest_size=8).digest()
    return max(members, key=score)


def share_of(digest: str, index: int, pieces: int, members: AbstractSet[str], me: str) -> list[int]:
    """The pieces of segment `index` that `me` owns among `members`."""
    return [p for p in range(pieces) if owner(digest, index, p, members) == me]


class Stripes:
    def __init__(self, swarm: Swarm, reader: PeerReader, download: Download, geometry: Geometry,
                 node_id: str) -> None:
        self.swarm = swarm
        self.reader = reader
        self.download = download
        self.digest = str(download.digest)
        self.geometry = geometry
        self.node_id = node_id
        self.members: dict[int, set[str]] = {}
        self._tasks: dict[int, asyncio.Task] = {}
        self._reads = Slots(CONCURRENT_READS)
        self._holds = Holds()

    def active(self, index: int) -> bool:
        task = self._tasks.get(index)
        return task is not None and not task.done()

    def started(self, index: int) -> bool:
        return index in self._tasks

    def start(self, index: int, members: set[str]) -> None:
        """Fetch this node's share of segment `index`."""
        self.members[index] = members | {self.node_id}
        self._tasks[index] = asyncio.create_task(self._fetch_share(index),
                                                 name=f"stripe {index} of {self.digest[:19]}")

    def join(self, index: int, members: set[str]) -> None:
        """Newly seen downloaders take their pieces from the rest of the share."""
        if index in self.members:
            self.members[index] |= members

    def paused(self) -> contextlib.AbstractContextManager:
        """No new reads meanwhile: while this node fetches a leased segment from
        upstream (the fleet waits for it, and reads would share its downlink), or
        the piece a client is blocked on (holders' uplinks go to first pieces)."""
        return self._holds.held()

    def cancel(self) -> None:
        for task in self._tasks.values():
            task.cancel()

    async def _fetch_share(self, index: int) -> None:
        start, end = self.geometry.segment_span(index)
        piece_size = self.geometry.piece_size
        first = start // piece_size
        key = (self.digest, index)
        # Hashing every (piece, member) pair is seconds of CPU for a huge segment:
        # off the loop. Members only join, and a joiner only takes pieces from
        # others' shares, so this share is a superset of the final one.
        share = await asyncio.to_thread(share_of, self.digest, index,
                                        self.geometry.pieces_in(index),
                                        frozenset(self.members[index]), self.node_id)
        for piece in share:
            if self.download.has_piece(first + piece) or \
                    owner(self.digest, index, piece, self.members[index]) != self.node_id:
                continue
            lo = start + piece * piece_size
            hi = min(lo + piece_size, end)
            await self._holds.wait_free()
            async with self._reads.slot(first + piece):
                if self.download.has_piece(first + piece):
                    continue
                data = await self.reader.read(self.download.digest, lo, hi, segment=index, bulk=True)
            if data is None:
                log.info("no holder of %s segment %d answered for piece %d; swarming the rest",
                         self.digest, index, piece)
                return
            if not self.download.has_piece(first + piece):  # BitTorrent may have been faster
                self.swarm.add_piece(key, piece, data)  # libtorrent checks the piece hash
