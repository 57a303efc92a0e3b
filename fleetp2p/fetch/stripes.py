"""While a segment's holders are few, each of its pieces leaves them once.

A segment that one node holds and fifteen download is bound by that node's
uplink. BitTorrent's rarest-first cannot see what other downloaders have
*requested*, so several of them ask the holder for the same piece at once:
on the 16-node bench the lone seed sent 2.2–2.5 copies of the blob before
its last piece had left it once, and the fleet waited for that piece.
(libtorrent's super-seeding is meant for this, but in 2.0/2.1 it offers the
first piece only after 10 s: the offer made during the handshake is dropped.)

So while holders are scarce each downloader takes pieces from a holder over
HTTP, one piece per read and READERS_PER_SEGMENT reads per segment, and hands
them to libtorrent, which checks each against the published piece hash. The
holder picks the piece: the lowest one it has not handed to anybody yet and
this downloader lacks (peering/handouts.py).
BitTorrent runs among the downloaders only, so every piece leaves a holder
about once and then spreads at the downloaders' combined rate, and each
downloader takes pieces at the rate it can. (Shares fixed in advance by
rendezvous hashing were uneven: on the fleet bench the largest of 15 was
1.4 x the smallest, and in the last 3 s only a few nodes still read from the
seed and had to fan all of it out.) A downloader whose holders have handed
out everything, or whose reads failed (holder gone, nobody answering),
connects to the holders like any peer once the segment stops progressing:
pieces handed to a downloader that vanished still arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections.abc import AsyncIterator

from fleetp2p.fetch.download import Download
from fleetp2p.peering.handouts import Span, bitfield
from fleetp2p.peering.holds import Holds
from fleetp2p.peering.peerhttp import PeerReader
from fleetp2p.store import Geometry
from fleetp2p.swarm import Swarm

log = logging.getLogger(__name__)

# Stripe while a segment has at least as many downloaders as holders: then the
# holders' uplinks are the bottleneck. A lone downloader stripes too (it is
# handed everything): it would otherwise open BitTorrent connections to the holder
# before the others show up, and their flows crowd out everyone's first piece.
STRIPE_RATIO = 1
# Reads in flight per set of holders (not per blob): enough to keep a holder
# busy, little memory on its side. In a cold pull each segment has its own
# holder (its lease holder); with 2 reads per blob, lowest piece first, the
# newest segment's holder got few of them while older segments' handouts went
# on, and handed out 20-45 pieces a second where its link carries 90. Per
# holder set the cold bench gained little, if anything: 36.4, 35.0, 35.2 s
# against 37.3, 35.3, 35.1 (alternating runs, with the sendfile answers of
# peerhttp.py); per segment (in a warm pull one holder has every segment) all
# of a blob's segments were handed out at once: warm 31 s against 28.
CONCURRENT_READS = 2
# Readers per segment, each with one read in flight. With one, a freed slot went
# to the next segment's waiting read and three segments advanced together, so
# the in-order prefix grew by three segments at once: every node then hashed
# them, and its client read and hashed them, at the same moment, and on the
# fleet bench every link dipped to about half for ~2 s right after each such
# wave. With two, the lowest unfinished segment takes both slots and segments
# complete nearly in order: warm 25.4-27.0 s in 10 runs against 26.4-28.7 s in
# 12 (measured the other way round, 30.8-32.5 against 28.9-31.4 s, while the
# bench's links still dropped packets: see tbf_burst in tests/fleet/netns.py).
# The second reader waits for the blob's first piece: started at once it took
# holder time from the clients' first pieces (peer time to first byte, max over
# 15 nodes: 0.30-0.56 s in 5 of 7 runs; 0.28-0.32 s in 3 with the wait).
READERS_PER_SEGMENT = 2


class Slots:
    """A semaphore that lets the lowest-numbered waiter in first: the holders'
    slots go to the lowest unfinished segment, whose pieces clients need next.

    With one reader per segment (each segment takes one piece at a time) a
    freed slot went to another segment's waiting read and the earliest
    segments advanced together; READERS_PER_SEGMENT says why each now has two.
    """

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


class Stripes:
    def __init__(self, swarm: Swarm, reader: PeerReader, download: Download, geometry: Geometry) -> None:
        self.swarm = swarm
        self.reader = reader
        self.download = download
        self.digest = str(download.digest)
        self.geometry = geometry
        self._tasks: dict[int, asyncio.Task] = {}
        self._reads: dict[frozenset[str], Slots] = {}  # holders → their reads
        self._holds = Holds()

    def active(self, index: int) -> bool:
        task = self._tasks.get(index)
        return task is not None and not task.done()

    def started(self, index: int) -> bool:
        return index in self._tasks

    def start(self, index: int) -> None:
        """Take pieces of segment `index` from its holders until they have handed out all."""
        self._tasks[index] = asyncio.create_task(self._take_segment(index),
                                                 name=f"stripe {index} of {self.digest[:19]}")

    def paused(self) -> contextlib.AbstractContextManager:
        """No new reads meanwhile: while this node fetches a leased segment from
        upstream (the fleet waits for it, and reads would share its downlink), or
        the piece a client is blocked on (holders' uplinks go to first pieces)."""
        return self._holds.held()

    def cancel(self) -> None:
        for task in self._tasks.values():
            task.cancel()

    async def _take_segment(self, index: int) -> None:
        async with asyncio.TaskGroup() as readers:
            readers.create_task(self._take_pieces(index))
            for _ in range(READERS_PER_SEGMENT - 1):
                readers.create_task(self._take_pieces(index, after_first_piece=True))

    async def _take_pieces(self, index: int, after_first_piece: bool = False) -> None:
        if after_first_piece:
            await self.download.wait_written(0)
        start, end = self.geometry.segment_span(index)
        span = Span(start, end, self.geometry.piece_size)
        first = start // span.piece
        key = (self.digest, index)
        for taken in itertools.count():
            await self._holds.wait_free()
            holders = frozenset(await self.reader.holders(self.download.digest, index))
            reads = self._reads.get(holders)
            if reads is None:  # a holder set not seen before (not a new Slots per piece)
                reads = self._reads[holders] = Slots(CONCURRENT_READS)
            async with reads.slot(first + taken):
                has = [self.download.has_piece(first + p) for p in range(span.pieces)]
                if all(has):
                    return
                have = bitfield(span.pieces, has.__getitem__)
                handout = await self.reader.handout(self.download.digest, index, span, have)
            if handout is None:
                log.info("no holder of %s segment %d answered; swarming the rest",
                         self.digest, index)
                return
            if handout.piece is None:
                return  # every piece this node lacks is on its way to another downloader
            if not self.download.has_piece(first + handout.piece):  # BitTorrent may have been faster
                self.swarm.add_piece(key, handout.piece, handout.data)  # libtorrent checks its hash
