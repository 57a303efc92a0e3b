"""One blob fetched by the fleet together: segments from peers where their
metainfo is published, from upstream under a tracker lease where it is not.

Read top to bottom, a node wanting a cold blob:
1. starts a torrent for every segment whose metainfo is published, and gives
   it the peers the tracker knows: holders and other downloaders (while the
   holders are few, this node takes pieces from them over HTTP, as they
   hand them out, and trades with the downloaders only: see stripes.py);
2. claims a lease on an unpublished segment and fetches it from upstream with
   a Range request, hashing pieces as they stream, then seeds it and
   publishes its metainfo, so the rest of the fleet can swarm it at once;
3. waits (tracker long-poll) for segments leased to others; a lease whose
   holder dies expires and is granted to the next claimer;
4. drops a stalled swarm to upstream for the pieces it misses;
5. if the tracker goes away, fetches what remains from upstream itself;
6. keeps what an interrupted earlier attempt left on disk (resume.py).

Pieces are marked readable as they land, so clients stream the blob in order
while it arrives; the whole-blob digest is checked by the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fleetp2p.errors import StorageError, UpstreamError
from fleetp2p.fetch.download import Download
from fleetp2p.fetch.receive import receive
from fleetp2p.fetch.resume import Resume, metainfo_path
from fleetp2p.fetch.stripes import Stripes, scarce
from fleetp2p.metrics import Metrics
from fleetp2p.peering.announcer import Announcer
from fleetp2p.peering.peerhttp import PeerReader
from fleetp2p.peering.timed import timed
from fleetp2p.store import BlobStore, Geometry, SegmentWriter
from fleetp2p.store.partials import Record
from fleetp2p.swarm import (HashFailed, PieceFinished, PieceHasher, SegmentChecked,
                            SegmentFinished, Swarm, SwarmEvent, TorrentFailed, make_metainfo)
from fleetp2p.swarm.metainfo import check_metainfo, piece_hash
from fleetp2p.upstream import UpstreamClient
from tracker.client import TrackerClient
from tracker.errors import TrackerError, TrackerUnavailable
from tracker.models import BlobRecord, LeaseGrant, Peer, SegmentMeta
from tracker.waits import wait_event

log = logging.getLogger(__name__)

POLL_TIMEOUT = 10.0
TRACKER_FAILURES = 3
PEER_LIMIT = 30
PEER_REFRESH = 2.0       # first re-ask for peers after this, then doubling…
PEER_REFRESH_MAX = 30.0  # …up to this
SEGMENT_IDLE = 2.0       # seconds without a piece of the blob before striped segments ask their holders
LEASE_DEFER = 10.0       # seconds after a publish that publishers leave the next lease to others
LEASE_SWARM_RATE = 256 * 1024  # bytes/s a lease holder swarms while its link carries upstream bytes
# After publishing a segment fetched from upstream (see _send_first_copies):
FIRST_COPIES_SHARE = 1 / 3  # of its arrival rate, for the uploads of the blob's other segments…
FIRST_COPIES_TIME = 1.3     # …for this many times as long as it took to arrive
TICK = 0.5
LEASE_GRACE = 0.1  # seconds past the end of another node's lease before claiming it


@dataclass
class Fleet:
    """What a cooperative fetch needs from the agent."""

    tracker: TrackerClient
    swarm: Swarm
    upstream: UpstreamClient
    store: BlobStore
    metrics: Metrics
    announcer: Announcer
    node_id: str
    labels: dict[str, str]
    peer_stall_timeout: float = 10.0
    parallel_leases: int = 1
    peer_reader: "PeerReader | None" = None


def leaves_lease_to_others(node_id: str, record: BlobRecord, peers: list[Peer]) -> bool:
    """A node that fetched a segment of this blob serves it now: its uplink is
    busy, and the acknowledgements of an upstream stream would queue behind its
    uploads (on the fleet bench a busy holder received upstream at 40-70 Mbit/s
    instead of 95). So the next lease goes to a downloader that has fetched
    nothing yet, if one is known."""
    publishers = {meta.node for meta in record.segments.values()}
    return node_id in publishers and any(p.fetching and p.node_id not in publishers
                                         for p in peers)


def refusal_wait(grant: LeaseGrant) -> float:
    """Seconds a refused claimer leaves the tracker alone (unless a publish
    comes first): until the soonest of the other nodes' leases ends. By then a
    live holder has renewed it (they renew every third of the TTL) and a dead
    one's lapsed, so it is taken over at once rather than up to a third of the
    TTL later. A tracker that gives no end is asked again after a third of the
    TTL; one that gives an end out of [0, TTL] is held to that range."""
    if grant.expires_in is None:
        return grant.ttl / 3
    return min(max(grant.expires_in, 0.0), grant.ttl) + LEASE_GRACE


class CooperativeFetch:
    def __init__(self, fleet: Fleet, download: Download, registry: str, repository: str,
                 record: BlobRecord) -> None:
        self.fleet = fleet
        self.download = download
        self.registry = registry
        self.repository = repository
        self.record = record
        self.digest = str(download.digest)
        self.geometry = Geometry(record.size, record.segment_size, record.piece_size)
        self.done: set[int] = set()
        self.swarming: set[int] = set()  # segments with a torrent
        self.patching: dict[int, asyncio.Task] = {}
        self.fetching: dict[int, asyncio.Task] = {}
        self.tracker_down = False
        self.tracker_failures = 0  # in a row; a busy tracker may miss one call
        self._wake = asyncio.Event()
        self._failure: BaseException | None = None
        self._waited = False
        self.writer: SegmentWriter | None = None
        self._background: set[asyncio.Task] = set()
        self.last_progress = time.monotonic()
        self.peers: list[Peer] = []
        self._peers_at = 0.0
        self._peers_interval = PEER_REFRESH / 2
        self._refreshing: asyncio.Task | None = None
        self.stripes: Stripes | None = None
        self.holders_connected: set[int] = set()
        self._leases_fetching = 0
        self._first_reads: set[int] = set()  # segments whose first piece was asked for over HTTP
        self._first_torrent = asyncio.Event()  # the first segment's torrent exists (or never will)
        self._defer_version = -1
        self._defer_since = 0.0
        self._refused: tuple[int, float] | None = None  # see _claim_waits
        self.resume = Resume(self.geometry, set(), {})
        self._withdrawing: set[int] = set()  # segments whose published metainfo is unusable

    @property
    def _reading_segment(self) -> int:
        """The segment of the first byte readers still wait for."""
        return self.download.written // self.geometry.segment_size

    @property
    def directory(self) -> Path:
        return self.fleet.store.path_for(self.download.digest)

    async def run(self) -> SegmentWriter:
        """All segments on disk (each piece hash-checked or self-fetched); the
        caller verifies the whole blob and commits the returned writer."""
        self.download.set_geometry(self.geometry)
        if self.fleet.peer_reader is not None:
            self.stripes = Stripes(self.fleet.swarm, self.fleet.peer_reader, self.download,
                                   self.geometry)
        # A client waits for the first piece, which needs a holder, not the swarm:
        # ask for it before anything else is set up (under load the setup below
        # is tens of milliseconds, which the request's round trip now overlaps).
        first = self._reading_segment
        early = self.record.segments.get(first)
        if early is not None:
            self._read_first_piece(first, early.metainfo)
            await asyncio.sleep(0)  # its request gets under way
        try:
            self.writer = await asyncio.to_thread(
                self.fleet.store.new_partial, self.download.digest, self.geometry,
                Record(self.download.digest, self.geometry))
            self.resume = await asyncio.to_thread(Resume.scan, self.directory, self.geometry)
        except BaseException:
            self._first_torrent.set()  # no torrent will come: the first read ends
            raise
        unsubscribe = self.fleet.swarm.subscribe(self.digest, self._on_event)
        poller = asyncio.create_task(self._poll(), name=f"poll {self.digest[:19]}")
        try:
            early_added = early is not None and self._add_segment(first, early)
            self._first_torrent.set()  # the first piece may go to libtorrent now
            self._check_unpublished()
            await self.fleet.announcer.join_swarm(self.digest)
            if early_added:
                self._connect(first)
                self._refresh_peers_soon()
            while len(self.done) < self.geometry.segments:
                if self._failure is not None:
                    raise self._failure
                self._swarm_published()
                if self.tracker_down:
                    self._fetch_remaining_upstream()
                else:
                    await self._claim()
                self._wake.clear()
                await wait_event(self._wake, TICK)
                await self._watch_stalls()
            # The last segments' publishes may still be on their way: let them land,
            # so a later withdrawal sees everything this node published.
            await asyncio.gather(*self.fetching.values(), return_exceptions=True)
            return self.writer
        except BaseException:
            self._stop_segments()
            raise
        finally:
            self._first_torrent.set()  # a first read still waiting must not wait forever
            poller.cancel()
            if self._refreshing is not None:
                self._refreshing.cancel()
            if self.stripes is not None:
                self.stripes.cancel()
            unsubscribe()
            for task in [*self.fetching.values(), *self.patching.values()]:
                task.cancel()
            await self._release_leases()

    # 1. segments with metainfo come from peers ------------------------------

    def _swarm_published(self) -> None:
        for index, meta in self.record.segments.items():
            if index not in self.done and index not in self.fetching and self._add_segment(index, meta):
                self._connect(index)
                self._refresh_peers_soon()

    def _add_segment(self, index: int, meta: SegmentMeta) -> bool:
        """Start the segment's torrent (and the read of the piece a client waits
        for, if it is in there); False if already started or its metainfo is bad."""
        if index in self.swarming:
            return False
        try:
            check_metainfo(meta.metainfo, index, self.geometry.segment_length(index),
                           self.geometry.piece_size)
        except ValueError as e:
            if index not in self._withdrawing:
                log.warning("withdrawing bad metainfo for %s segment %d: %s", self.digest, index, e)
                self._withdrawing.add(index)
                self._spawn(self._withdraw_bad(index, meta))
            return False
        self.fleet.swarm.add_segment((self.digest, index), meta.metainfo, self.directory, seed=False)
        if self.resume.saved.get(index) != meta.metainfo:
            self._keep_metainfo(index, meta.metainfo)
        self.swarming.add(index)
        self.last_progress = time.monotonic()
        self.download.segment_sources[index] = "peer"
        if not self.resume.begin_check(index) and index == self._reading_segment:
            self._read_first_piece(index, meta.metainfo)
        return True

    async def _withdraw_bad(self, index: int, meta: SegmentMeta) -> None:
        """Nobody can swarm that metainfo and, while it is published, nobody leases
        the segment: withdrawn (if still the same), it is fetched from upstream."""
        fleet = self.fleet
        try:
            self.record = await fleet.tracker.withdraw(self.digest, index, info_hash=meta.info_hash)
        except (TrackerUnavailable, TrackerError) as e:
            log.warning("withdrawing %s segment %d failed: %s", self.digest, index, e)
        finally:
            self._withdrawing.discard(index)
        self._wake.set()

    def _check_unpublished(self) -> None:
        """Segments an earlier attempt saved metainfo for, which the tracker does
        not know: checked against that metainfo, published if complete."""
        for index, metainfo in self.resume.saved.items():
            if index in self.record.segments or index in self.swarming:
                continue
            self.fleet.swarm.add_segment((self.digest, index), metainfo, self.directory, seed=False)
            self.swarming.add(index)
            self.download.segment_sources[index] = "local"
            self.resume.unpublished[index] = metainfo
            self.resume.begin_check(index)

    def _read_first_piece(self, index: int, metainfo: bytes) -> None:
        if index not in self._first_reads:
            self._first_reads.add(index)
            self._spawn(self._first_piece_over_http(index, metainfo))

    def _refresh_peers_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh_peers())

    async def _refresh_peers(self) -> None:
        """One peer list per blob (not per segment: a fleet of thousands pulling a
        blob of hundreds of segments would flood the tracker), refreshed with a
        growing interval so newcomers join the swarm."""
        fleet = self.fleet
        self._peers_at = time.monotonic()
        self._peers_interval = min(PEER_REFRESH_MAX, self._peers_interval * 2)
        try:
            self.peers = await timed(fleet.metrics, "peers", lambda: fleet.tracker.peers(
                self.digest, node=fleet.node_id, limit=PEER_LIMIT,
                zone=fleet.labels.get("zone"), rack=fleet.labels.get("rack")))
        except (TrackerUnavailable, TrackerError) as e:
            log.debug("peer list for %s: %s", self.digest, e)
            return
        for index in self.swarming:
            if index not in self.done:
                self._connect(index)

    def _connect(self, index: int) -> None:
        """Give libtorrent the segment's peers: holders and other downloaders, or
        only the downloaders while this node fetches its stripe from scarce holders."""
        if index in self.resume.checking:
            return  # peers once libtorrent knows what is on disk: see _checked
        holders = self._holders_of(index)
        peers = [p for p in self.peers if p.fetching and not p.has(index)]  # other downloaders
        key = (self.digest, index)
        stripes = self.stripes
        if stripes is not None and not stripes.started(index) and \
                scarce(len(holders), len(peers) + 1):
            stripes.start(index)
            if index in self.holders_connected:  # connected before the others showed up
                self.holders_connected.discard(index)
                self.fleet.swarm.disconnect(key)
        if stripes is None or not stripes.started(index) or index in self.holders_connected:
            peers += holders
            self.holders_connected.add(index)
        self.fleet.swarm.connect(key, [(p.host, p.port) for p in peers])

    def _downloaders(self) -> list[str]:
        """Peer HTTP addresses of the blob's other downloaders, as last heard."""
        return [p.http for p in self.peers if p.fetching and p.http]

    def _holders_of(self, index: int) -> list[Peer]:
        return [p for p in self.peers if p.has(index)]

    def _connect_holders_when_idle(self, now: float) -> None:
        """A finished stripe does not connect to the holders at once: the pieces
        handed to others still spread, and asking the holders for them
        duplicates them. Only when the whole blob stops progressing (a
        downloader left with pieces handed to it, or reads failed) do the
        unfinished segments need the holders' own uplinks. Not per segment: a
        segment's last handouts may take seconds to spread while downloaders
        are busy with other segments (with 16 MiB segments and fixed shares,
        connecting per segment cost the seed 25% more bytes on the fleet bench)."""
        if now - self.last_progress < SEGMENT_IDLE or self.stripes is None:
            return
        for index in self.swarming:
            if index in self.done or index in self.holders_connected or self.stripes.active(index):
                continue
            self.holders_connected.add(index)
            self.fleet.swarm.connect((self.digest, index),
                                     [(p.host, p.port) for p in self._holders_of(index)])

    def _on_event(self, event: SwarmEvent) -> None:
        index = event.key[1]
        if index not in self.swarming:
            return
        if isinstance(event, PieceFinished):
            self.last_progress = time.monotonic()
            self.resume.found(index, event.piece)
            first = index * self.geometry.segment_size // self.geometry.piece_size
            self.download.mark_pieces(first + event.piece, first + event.piece + 1)
        elif isinstance(event, SegmentFinished):
            self._segment_done(index, "local" if self.resume.complete_on_disk(index) else "peer")
            if index in self.resume.unpublished and not self.tracker_down:
                self._spawn(self._publish(index, self.resume.unpublished.pop(index)))
        elif isinstance(event, SegmentChecked):
            self._checked(index)
        elif isinstance(event, HashFailed):
            log.info("piece %d of %s segment %d failed its hash; refetching it", event.piece,
                     self.digest, index)
        elif isinstance(event, TorrentFailed):
            self._torrent_failed(index, event.message)

    def _torrent_failed(self, index: int, message: str) -> None:
        """libtorrent stops a torrent on a file error. A segment still coming in
        never will (a full disk, say): fail the fetch rather than leave clients
        hanging. A complete segment's pieces were verified as they landed: the
        stopped torrent only stops seeding it, and the fetch goes on (a file that
        can no longer be read fails it when the whole blob is hashed)."""
        if index in self.done:
            log.warning("%s segment %d is complete but no longer seeded: %s", self.digest,
                        index, message)
        elif self._failure is None:
            self._failure = StorageError(f"{self.digest} segment {index}: {message}")
            self._wake.set()

    # 2. unpublished segments come from upstream, one lease at a time ---------

    async def _claim(self) -> None:
        fleet = self.fleet
        wanted = [i for i in self.record.missing() if i not in self.done
                  and i not in self.fetching and i not in self.resume.unpublished]
        room = fleet.parallel_leases - len(self.fetching)
        now = time.monotonic()
        if not wanted or room <= 0 or self._defers_lease(now) or self._claim_waits(now):
            return
        try:
            grant = await timed(fleet.metrics, "claim", lambda: fleet.tracker.claim(
                self.digest, fleet.node_id, segments=wanted, count=room))
        except TrackerUnavailable as e:
            self.tracker_failures += 1
            if self.tracker_failures >= TRACKER_FAILURES:
                log.warning("tracker unreachable while fetching %s (%s); continuing from upstream",
                            self.digest, e)
                self.tracker_down = True
            return
        except TrackerError as e:
            log.warning("lease claim for %s refused: %s", self.digest, e)
            return
        self.tracker_failures = 0
        for index in grant.granted:
            if index not in self.fetching and index not in self.done:
                self._start_upstream(index, leased=True, ttl=grant.ttl)
        self._refused = None
        if not grant.granted and grant.holders:
            self._refused = (grant.version, now + refusal_wait(grant))
            if not self._waited:
                fleet.metrics.lease_waits.inc()
                self._waited = True

    def _claim_waits(self, now: float) -> bool:
        """After a claim refused because others hold the leases, the next one
        waits for the tracker's record to change (a publish frees a lease, and
        the long-poll brings it at once) or for the soonest of those leases to
        end (see refusal_wait). Claiming on every tick instead cost the 16-node
        cold bench 571 claims for its 8 leases, a load on the tracker that grows
        with the fleet."""
        if self._refused is None:
            return False
        version, until = self._refused
        return self.record.version <= version and now < until

    def _defers_lease(self, now: float) -> bool:
        """See leaves_lease_to_others; if nobody took the lease within
        LEASE_DEFER of the last publish this node saw (they died, or are slow),
        anyone may. The window outlasts a lease: this node may see a publish
        only after its claim for the next segment went out, so the window runs
        from the publish before, and at 2 s two of eight leases on the fleet
        bench still went to publishers."""
        if self._defer_version != self.record.version:
            self._defer_version, self._defer_since = self.record.version, now
        return now - self._defer_since < LEASE_DEFER and \
            leaves_lease_to_others(self.fleet.node_id, self.record, self.peers)

    def _fetch_remaining_upstream(self) -> None:
        for index in range(self.geometry.segments):
            if index in self.done or index in self.fetching:
                continue
            if index in self.swarming and self.fleet.swarm.peer_count((self.digest, index)):
                continue
            if len(self.fetching) >= max(2, self.fleet.parallel_leases):
                return
            self.fleet.swarm.remove_segment((self.digest, index))
            self.swarming.discard(index)
            self._start_upstream(index, leased=False, ttl=0)

    def _start_upstream(self, index: int, *, leased: bool, ttl: float) -> None:
        task = asyncio.create_task(self._fetch_segment(index, leased, ttl),
                                   name=f"segment {index} of {self.digest[:19]}")
        self.fetching[index] = task

        def finished(t: asyncio.Task) -> None:
            self.fetching.pop(index, None)
            if not t.cancelled() and t.exception() is not None and self._failure is None:
                self._failure = t.exception()
            self._wake.set()
        task.add_done_callback(finished)

    async def _fetch_segment(self, index: int, leased: bool, ttl: float) -> None:
        fleet = self.fleet
        start, end = self.geometry.segment_span(index)
        self.download.segment_sources[index] = "upstream"
        renewer = asyncio.create_task(self._renew(index, ttl)) if leased else None
        began = time.monotonic()
        try:
            with self._downlink_to_upstream() if leased else contextlib.nullcontext():
                hasher = await self._stream_segment(start, end)
        finally:
            if renewer is not None:
                renewer.cancel()
        took = max(time.monotonic() - began, 1e-3)
        metainfo = make_metainfo(index, end - start, self.geometry.piece_size, hasher.finish())
        await asyncio.to_thread(self._save_metainfo, index, metainfo)
        fleet.swarm.add_segment((self.digest, index), metainfo, self.directory, seed=True)
        self._segment_done(index, "upstream")
        if not self.tracker_down:
            await self._publish(index, metainfo)
            self._send_first_copies(index, took, (end - start) / took)
            await self._refresh_peers()  # who else downloads: see _defers_lease

    def _send_first_copies(self, index: int, took: float, rate: float) -> None:
        """A segment just fetched from upstream has one holder, and the fleet's
        first copies of it can only leave through this node's uplink: each piece
        once, as the downloaders' stripes ask for it. Meanwhile its BitTorrent
        uploads are held to a trickle (BitTorrent peers asking it for pieces the
        stripes also fetch would have them sent twice), and those of the blob's
        other segments, which many nodes hold by now, to a third of the rate the
        new one arrived at. For a little longer than it took to arrive: over a
        symmetric link one copy takes about that long to leave, the last stripes
        a little more. On the 16-node cold bench the last copy came 0.9 s sooner
        (4 runs each, alternating with and without); holding only the other
        segments' uploads gained nothing measurable, only this one's 0.5 s.
        A hold that a later publish renews is lifted by the earlier timer: a
        publisher rarely fetches again within the window (see LEASE_DEFER)."""
        swarm = self.fleet.swarm
        fresh = [(self.digest, index)]
        others = [(self.digest, i) for i in (self.swarming | self.done) - {index}]
        swarm.hold_uploads(fresh, 1)  # a trickle: the swarm raises it to its minimum
        if others:
            swarm.hold_uploads(others, int(rate * FIRST_COPIES_SHARE / len(others)))
        asyncio.get_running_loop().call_later(took * FIRST_COPIES_TIME, swarm.hold_uploads,
                                              fresh + others, 0)

    async def _publish(self, index: int, metainfo: bytes) -> None:
        fleet = self.fleet
        try:
            self.record = await timed(fleet.metrics, "publish", lambda: fleet.tracker.publish(
                self.digest, index, fleet.node_id, metainfo))
        except (TrackerUnavailable, TrackerError) as e:
            log.warning("publishing %s segment %d failed: %s", self.digest, index, e)

    async def _stream_segment(self, start: int, end: int) -> PieceHasher:
        """Bytes [start, end) from upstream into the segment file, pieces hashed and
        marked readable as they land."""
        stream = await self.fleet.upstream.open_blob(self.registry, self.repository,
                                                     self.download.digest, start, end)
        hasher = PieceHasher(self.geometry.piece_size)
        assert self.writer is not None
        writer = self.writer

        def write(data: bytes, offset: int) -> None:
            writer.pwrite(data, offset)
            hasher.update(data)

        piece = self.geometry.piece_size

        def progress(written_to: int) -> None:
            self.last_progress = time.monotonic()
            complete_to = written_to if written_to == end else written_to - written_to % piece
            if complete_to > start:
                self.download.mark_pieces(start // piece, -(-complete_to // piece))

        try:
            await receive(stream.chunks(), write, start, progress)
        finally:
            await stream.close()
        return hasher

    @contextlib.contextmanager
    def _downlink_to_upstream(self) -> Iterator[None]:
        """The fleet waits for a leased segment: give it this node's whole link.
        Not only the downlink: acknowledgements of the upstream stream queue
        behind whatever the uplink sends, and a saturated uplink halved the
        upstream rate in the fleet bench."""
        self._leases_fetching += 1
        self.fleet.swarm.limit(self.digest, LEASE_SWARM_RATE)
        for index in self.swarming - self.done:
            # Peers already hold seconds' worth of this node's requests, and would
            # send them at full speed whatever the cap (on the fleet bench, lease
            # holders received nearly as much BitTorrent as upstream): new
            # connections, with the cap from their first request.
            self.fleet.swarm.disconnect((self.digest, index))
            self._connect(index)
        try:
            with self._stripes_paused():
                yield
        finally:
            self._leases_fetching -= 1
            if not self._leases_fetching:
                self.fleet.swarm.limit(self.digest, 0)

    def _stripes_paused(self) -> contextlib.AbstractContextManager:
        return self.stripes.paused() if self.stripes is not None else contextlib.nullcontext()

    async def _renew(self, index: int, ttl: float) -> None:
        fleet = self.fleet
        while True:
            await asyncio.sleep(max(ttl / 3, 0.5))
            try:
                renewal = await fleet.tracker.renew(self.digest, fleet.node_id, [index])
            except (TrackerUnavailable, TrackerError):
                continue  # keep fetching: the bytes are still good
            if index in renewal.lost:
                log.info("lease on %s segment %d lost; someone else fetches it", self.digest, index)
                task = self.fetching.get(index)
                if task is not None:
                    task.cancel()
                return

    # 3. learn about segments published by others ----------------------------

    async def _poll(self) -> None:
        fleet = self.fleet
        while True:
            if self.tracker_down:
                return
            try:
                record = await fleet.tracker.wait(self.digest, self.record.version, POLL_TIMEOUT)
            except TrackerUnavailable:
                self.tracker_failures += 1
                if self.tracker_failures >= TRACKER_FAILURES:
                    self.tracker_down = True
                    self._wake.set()
                    return
                await asyncio.sleep(1.0)
                continue
            except TrackerError:
                await asyncio.sleep(1.0)
                continue
            if record.version != self.record.version:
                self.record = record
                self._wake.set()

    # 4. stalled swarms fall back to upstream ---------------------------------

    async def _watch_stalls(self) -> None:
        """A segment waiting for bandwidth in a busy swarm is not stalled: only a
        blob that made no progress at all for `peer_stall_timeout` is. Then the
        missing pieces of its first unfinished segment (readers need it first)
        come from upstream, one segment at a time."""
        now = time.monotonic()
        timeout = self.fleet.peer_stall_timeout
        if any(i not in self.done for i in self.swarming) and \
                now - self._peers_at > self._peers_interval:
            self._refresh_peers_soon()
        self._connect_holders_when_idle(now)
        idle = now - self.last_progress
        if self.patching or idle <= timeout:
            return
        waiting = sorted(i for i in self.swarming if i not in self.done)
        if not waiting:
            return
        index = waiting[0]
        log.info("no progress on %s for %.1fs; fetching the missing pieces of segment %d "
                 "from upstream", self.digest, idle, index)
        self.last_progress = now
        task = asyncio.create_task(self._patch_from_upstream(index))
        self.patching[index] = task
        task.add_done_callback(lambda t, i=index: self.patching.pop(i, None))

    def _missing_runs(self, index: int) -> list[tuple[int, int]]:
        """[start, end) byte runs of the segment's pieces not on disk yet."""
        start, end = self.geometry.segment_span(index)
        piece = self.geometry.piece_size
        runs: list[tuple[int, int]] = []
        for p in range(start // piece, -(-end // piece)):
            if self.download.has_piece(p):
                continue
            lo, hi = p * piece, min((p + 1) * piece, end)
            if runs and runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], hi)
            else:
                runs.append((lo, hi))
        return runs

    async def _patch_from_upstream(self, index: int) -> None:
        """Fetch the pieces the swarm did not deliver; libtorrent checks each
        against the published hash before it counts."""
        piece = self.geometry.piece_size
        first_piece = self.geometry.segment_span(index)[0] // piece
        for start, end in self._missing_runs(index):
            try:
                stream = await self.fleet.upstream.open_blob(self.registry, self.repository,
                                                             self.download.digest, start, end)
            except UpstreamError as e:
                log.warning("upstream patch of %s segment %d failed: %s", self.digest, index, e)
                return
            buffer = bytearray()
            position = start
            try:
                async for chunk in stream.chunks():
                    buffer += chunk
                    while len(buffer) >= piece or (buffer and position + len(buffer) == end):
                        n = min(piece, len(buffer))
                        global_piece = position // piece
                        if not self.download.has_piece(global_piece):
                            self.fleet.swarm.add_piece((self.digest, index), global_piece - first_piece,
                                                       bytes(buffer[:n]))
                        del buffer[:n]
                        position += n
            finally:
                await stream.close()

    # 5. the first piece a reader waits for, over HTTP -------------------------

    async def _first_piece_over_http(self, index: int, metainfo: bytes) -> None:
        """libtorrent dials peers on its ~1 s tick and queues behind bulk requests;
        the piece a client is blocked on is faster as one HTTP range from a
        holder's agent. It is checked against the published hash and written to
        the segment file here, so the client's stream can go on at once, then
        handed to libtorrent (which checks it again, writes the same bytes and
        seeds them). Waiting for libtorrent's own write instead (its network
        thread, its disk thread, then its alert back to this loop) took 1-72 ms
        more per node on the loaded fleet bench."""
        reader = self.fleet.peer_reader
        if reader is None:
            return
        start, end = self.geometry.segment_span(index)
        piece = self.geometry.piece_size
        global_piece = start // piece
        if self.download.has_piece(global_piece):
            return
        with self._stripes_paused():  # holders' uplinks go to the piece a client waits for
            data = await reader.read(self.download.digest, start, min(start + piece, end),
                                     segment=index, others=self._downloaders)
        if data is None or self.download.has_piece(global_piece):
            return
        expected = piece_hash(metainfo, 0)
        if expected is None or hashlib.sha1(data).digest() != expected:
            self.fleet.metrics.piece_hash_failures.inc()
            return
        await self._first_torrent.wait()  # the read may beat the segment's torrent
        if self.writer is None or self.download.has_piece(global_piece):
            return
        try:
            await asyncio.to_thread(self.writer.pwrite, data, start)
        except OSError as e:  # the fetch ended and its files went away meanwhile
            log.debug("first piece of %s segment %d: %s", self.digest, index, e)
            return
        self.download.mark_pieces(global_piece, global_piece + 1)
        self.fleet.swarm.add_piece((self.digest, index), 0, data)

    # 6. what an interrupted attempt left on disk (see resume.py) --------------

    def _checked(self, index: int) -> None:
        found = self.resume.checked(index)
        if index in self.resume.unpublished and index not in self.done:
            # Incomplete, and only this node knows its metainfo: nobody can send
            # the rest. Fetch it like any unpublished segment.
            log.info("%s segment %d: %d bytes on disk, not complete and not published; "
                     "fetching it again", self.digest, index, found)
            self.fleet.swarm.remove_segment((self.digest, index))
            self.swarming.discard(index)
            self.resume.forget(index)
            self._wake.set()
            return
        if found:
            self.fleet.metrics.resumed_bytes.inc(found)
            log.info("%s segment %d: kept %d bytes left on disk by an interrupted download",
                     self.digest, index, found)
        if index not in self.done:
            self._connect(index)
            meta = self.record.segments.get(index)
            if meta is not None and index == self._reading_segment:
                self._read_first_piece(index, meta.metainfo)

    # Bookkeeping ----------------------------------------------------------

    def _segment_done(self, index: int, source: str) -> None:
        if index in self.done:
            return
        self.done.add(index)
        self.last_progress = time.monotonic()
        start, end = self.geometry.segment_span(index)
        piece = self.geometry.piece_size
        self.download.mark_pieces(start // piece, -(-end // piece))
        self.download.segment_sources[index] = source
        self.fleet.metrics.segments.labels(source).inc()
        self.fleet.metrics.fetched_bytes.labels(source).inc(end - start - self.resume.found_in(index))
        self.fleet.announcer.hold_segment(self.digest, index)
        self._wake.set()

    def _save_metainfo(self, index: int, metainfo: bytes) -> None:
        """Kept beside the segment: a restarted agent checks what is on disk against it."""
        metainfo_path(self.directory, index).write_bytes(metainfo)

    def _keep_metainfo(self, index: int, metainfo: bytes) -> None:
        self._spawn(asyncio.to_thread(self._save_metainfo, index, metainfo))

    def _spawn(self, coro) -> None:
        """Fire-and-forget work, kept referenced until done."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _stop_segments(self) -> None:
        self.fleet.swarm.remove_blob(self.digest)
        self.fleet.announcer.drop(self.digest)

    async def _release_leases(self) -> None:
        if self.tracker_down:
            return
        try:
            await self.fleet.tracker.release(self.digest, self.fleet.node_id)
        except (TrackerUnavailable, TrackerError):
            pass
