"""Stripes (fleetp2p/fetch/stripes.py) and the rules around them:
holders handing each piece out once, bulk reads yielding to urgent ones, lease rotation
and blob-wide rate caps. The whole path
through real libtorrent swarms runs in test_swarm_fetch.py and tests/fleet."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from fleetp2p.fetch.cooperative import leaves_lease_to_others
from fleetp2p.fetch.download import Download
from fleetp2p.fetch.stripes import Slots, Stripes, scarce
from fleetp2p.metrics import HEDGE_WINNERS, Metrics
from fleetp2p.oci.reference import Digest
from fleetp2p.peering.handouts import ROUND_QUIET, ROUND_TTL, Handouts, Span, bitfield, has_bit
from fleetp2p.peering.holds import Holds
from fleetp2p.peering.openreaders import IDLE, OpenReaders
from fleetp2p.peering.peerhttp import Handout, PeerReader, _left, peer_app
from fleetp2p.store import Geometry, SegmentReader
from fleetp2p.store.segments import segment_path
from fleetp2p.swarm import Swarm, make_metainfo
from fleetp2p.swarm.session import MIN_RATE
from tracker.models import BlobRecord, MiB, Peer, SegmentMeta

DIGEST = "sha256:" + "ab" * 32
PIECE = 64 * 1024


def test_a_holder_hands_out_each_piece_once_lowest_first():
    handouts = Handouts()
    span = Span(0, 10 * PIECE + 5, PIECE)               # 11 pieces, the last one short
    assert span.pieces == 11 and span.bounds(10) == (10 * PIECE, 10 * PIECE + 5)
    nothing = bitfield(11, lambda p: False)
    taken = [handouts.take(DIGEST, span, nothing, lambda lo, hi: True) for _ in range(11)]
    assert taken == list(range(11))
    assert handouts.take(DIGEST, span, nothing, lambda lo, hi: True) is None
    assert handouts.take(DIGEST, Span(PIECE, 3 * PIECE, PIECE), bitfield(2, lambda p: False),
                         lambda lo, hi: True) == 0      # another segment: its own round


def test_a_handout_skips_what_the_reader_has_and_the_holder_lacks():
    handouts = Handouts()
    span = Span(0, 12 * PIECE, PIECE)
    have = bitfield(12, lambda p: p in (0, 1, 9))
    assert [has_bit(have, p) for p in (0, 1, 2, 8, 9, 10)] == [True, True, False, False, True, False]
    held = lambda lo, hi: lo != 2 * PIECE                # noqa: E731 - piece 2 is not verified here
    assert handouts.take(DIGEST, span, have, held) == 3
    assert handouts.take(DIGEST, span, have, lambda lo, hi: True) == 2
    with pytest.raises(ValueError):
        handouts.take(DIGEST, span, b"\0", held)        # a bitfield of the wrong length


def test_a_piece_given_back_goes_to_the_next_reader_and_rounds_expire():
    now = [0.0]
    handouts = Handouts(clock=lambda: now[0])
    span = Span(0, 4 * PIECE, PIECE)
    nothing = bitfield(4, lambda p: False)

    def take() -> int | None:
        return handouts.take(DIGEST, span, nothing, lambda lo, hi: True)
    assert [take() for _ in range(3)] == [0, 1, 2]
    now[0] += ROUND_TTL - 1                    # unfinished: readers busy elsewhere, it waits
    assert take() == 3
    handouts.give_back(DIGEST, span, 1)
    now[0] += ROUND_QUIET + 1                  # a piece is back: still unfinished
    assert take() == 1
    now[0] += ROUND_QUIET - 1                  # all handed out, and asked again soon: none left
    assert take() is None
    now[0] += ROUND_QUIET                      # a quiet spell after the last: a later wave starts over
    assert take() == 0
    now[0] += ROUND_TTL
    assert take() == 0                         # and an unfinished round is forgotten after ROUND_TTL


def test_spans_refuse_nonsense_and_find_their_pieces():
    for start, end, piece in ((5, 5, 1), (-1, 4, 1), (0, 4, 0), (0, 1 << 40, 1)):
        with pytest.raises(ValueError):
            Span(start, end, piece)
    span = Span(3 * PIECE, 6 * PIECE - 7, PIECE)
    assert span.piece_at(4 * PIECE, 5 * PIECE) == 1 and span.piece_at(5 * PIECE, 6 * PIECE - 7) == 2
    assert span.piece_at(4 * PIECE, 5 * PIECE - 1) is None and span.piece_at(0, PIECE) is None


async def test_readers_take_every_piece_once_through_the_holders_app(tmp_path: Path):
    """Two stripe readers against one holder's app: between them they get every
    piece of the segment exactly once, with the bytes of that piece; then the
    holder says it has handed out all (None)."""
    size = 10 * PIECE + 100
    blob = bytes(range(256)) * (size // 256) + bytes(size % 256)
    holder = await _peer(holding(tmp_path, blob))
    url = f"http://127.0.0.1:{holder.port}"
    readers = [PeerReader(CountingTracker(url), f"r{i}", None, Metrics(), None)  # type: ignore[arg-type]
               for i in range(2)]
    digest = Digest.parse(DIGEST)
    span = Span(2 * PIECE, size, PIECE)
    got: list[int] = []
    try:
        for turn in range(span.pieces + 2):
            handout = await readers[turn % 2].handout(digest, 0, span, bitfield(span.pieces, got.__contains__))
            assert handout is not None
            if handout.piece is None:
                break
            lo, hi = span.bounds(handout.piece)
            assert handout.data == blob[lo:hi]
            got.append(handout.piece)
        assert got == list(range(span.pieces)) and handout.piece is None
    finally:
        for reader in readers:
            await reader.close()
        await holder.close()


async def test_a_malformed_handout_request_is_a_bad_request(tmp_path: Path):
    holder = await _peer(holding(tmp_path, bytes(4 * PIECE)))
    base = f"/peer/v1/blobs/{DIGEST}/handout"
    try:
        async with aiohttp.ClientSession() as session:
            for query in ("start=0&end=100&piece=100", "start=0&end=100&piece=100&have=zz",
                          "start=0&end=100&piece=100&have=0000", f"start=0&end={5 * PIECE}&piece=100&have=00",
                          "start=x&end=100&piece=100&have=00", "start=50&end=10&piece=1&have=00"):
                async with session.get(holder.make_url(f"{base}?{query}")) as resp:
                    assert resp.status == 400, query
    finally:
        await holder.close()


def test_scarce_holders():
    assert scarce(1, 1) and scarce(1, 15) and scarce(2, 2)
    assert not scarce(0, 15) and not scarce(3, 2)


def test_download_covers_only_finished_pieces(tmp_path: Path):
    download = Download(Digest.parse(DIGEST), tmp_path)
    assert not download.covers(0, 10)                    # no geometry yet
    download.set_geometry(Geometry(10 * 1024, 4096, 1024))
    download.mark_pieces(2, 5)
    assert download.covers(2048, 5120) and download.covers(2100, 2200)
    assert not download.covers(1000, 3000) and not download.covers(4000, 6000)
    assert not download.covers(0, 0) and not download.covers(9000, 20000)


class SlowReader(SegmentReader):
    """A reader of a one-segment blob whose file takes a while to open, like a busy disk."""

    def __init__(self, directory: Path, size: int, delay: float) -> None:
        super().__init__(directory, Geometry(size, size, size))
        self.delay = delay

    def file(self, index: int):
        time.sleep(self.delay)
        return super().file(index)


def holding(tmp_path: Path, data: bytes, delay: float = 0.0):
    """A peer server's lookup: this node holds `data` (verified), on disk."""
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    segment_path(directory, 0).write_bytes(data)
    return lambda digest, start, end: (lambda: SlowReader(directory, len(data), delay), len(data))


class Source:
    """Something a lookup answers from (a store entry, a download): readers are kept per source."""

    def __init__(self, tmp_path: Path) -> None:
        self.lookup = holding(tmp_path, b"x" * 100)
        self.made: list[SegmentReader] = []

    def reader(self) -> SegmentReader:
        self.made.append(self.lookup(DIGEST, 0, 0)[0]())
        return self.made[-1]


async def test_a_holder_keeps_one_reader_per_source_open_while_it_is_used(tmp_path: Path):
    now = [0.0]
    readers = OpenReaders(clock=lambda: now[0])
    one, two = Source(tmp_path), Source(tmp_path)
    with readers.reader(one.reader) as first:
        first.file(0)
        with readers.reader(one.reader) as again, readers.reader(two.reader) as other:
            assert again is first and other is not first
        now[0] += IDLE + 1
        with readers.reader(two.reader):
            assert first.opened(0) is not None  # idle long enough, but in use
    assert one.made == [first]
    now[0] += IDLE + 1
    with readers.reader(two.reader):            # the next answer closes those idle since
        assert first.opened(0) is None
    with readers.reader(one.reader) as fresh:
        assert fresh is not first and len(one.made) == 2
    readers.close()
    assert fresh.opened(0) is None


async def test_idle_readers_are_closed_without_another_answer(tmp_path: Path):
    """A blob that GC removed must not keep its disk space through an open file."""
    readers = OpenReaders(idle=0.05)
    source = Source(tmp_path)
    with readers.reader(source.reader) as reader:
        reader.file(0)
    await asyncio.sleep(0.3)
    assert reader.opened(0) is None
    readers.close()


async def _get(session: aiohttp.ClientSession, server: TestServer, bulk: bool) -> tuple[int, float]:
    """A range read (a client waits for it), or a stripe's handout (bulk) of the first 100 bytes."""
    if bulk:
        url = server.make_url(f"/peer/v1/blobs/{DIGEST}/handout?start=0&end=100&piece=100&have=00")
        headers = {}
    else:
        url, headers = server.make_url(f"/peer/v1/blobs/{DIGEST}"), {"Range": "bytes=0-99"}
    async with session.get(url, headers=headers) as resp:
        await resp.read()
        return resp.status, asyncio.get_running_loop().time()


async def test_bulk_reads_wait_for_urgent_ones(tmp_path: Path):
    app = peer_app(holding(tmp_path, bytes(1000), 0.3), Metrics(), None)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            urgent = asyncio.create_task(_get(session, server, bulk=False))
            await asyncio.sleep(0.05)                     # the urgent read is being answered
            bulk_status, bulk_done = await _get(session, server, bulk=True)
            urgent_status, urgent_done = await urgent
            assert (urgent_status, bulk_status) == (206, 206)
            assert bulk_done > urgent_done                 # it waited instead of sharing the link
    finally:
        await server.close()


async def test_a_response_counts_as_sent_once_acknowledged():
    """`_left` waits while the receiver leaves bytes unread (they stay in the
    sender's queue), and returns soon after it reads: once the bytes are
    acknowledged, i.e. in the receiver's kernel buffer (its application may
    not have read the last of them yet)."""
    received = bytearray()
    reading = asyncio.Event()
    done = asyncio.Event()

    async def receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reading.wait()
        while len(received) < 4 * 1024 * 1024:
            received.extend(await reader.read(1 << 20))
        done.set()
        writer.close()

    server = await asyncio.start_server(receiver, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x" * (4 * 1024 * 1024))
        started = time.monotonic()
        await _left(writer.transport, limit=0.3)           # nobody reads: gives up at the limit
        assert time.monotonic() - started >= 0.3
        reading.set()
        started = time.monotonic()
        await _left(writer.transport, limit=5.0)
        assert time.monotonic() - started < 2.0
        await asyncio.wait_for(done.wait(), 5.0)
        writer.close()
    finally:
        server.close()


async def test_waiting_for_bytes_to_leave_ends_when_the_reader_resets():
    """A hedged read that lost its race closes its connection while the holder
    waits for the response to leave: the wait ends, without an error."""
    accepted: list[asyncio.StreamWriter] = []

    async def receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # never reads

    server = await asyncio.start_server(receiver, "127.0.0.1", 0)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(b"x" * (4 * 1024 * 1024))
        waiting = asyncio.create_task(_left(writer.transport, limit=5.0))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        accepted[0].transport.abort()  # the reader resets the connection
        started = time.monotonic()
        await asyncio.wait_for(waiting, 2.0)
        assert time.monotonic() - started < 1.0
        writer.close()
    finally:
        server.close()


async def test_stripe_reads_go_lowest_piece_first():
    """Segments' stripes run one after another: a waiter for an earlier piece
    overtakes later ones, and a cancelled waiter does not keep its turn."""
    slots = Slots(1)
    order: list[int] = []

    async def read(piece: int) -> None:
        async with slots.slot(piece):
            order.append(piece)
            await asyncio.sleep(0.01)

    async with slots.slot(0):
        tasks = {p: asyncio.create_task(read(p)) for p in (900, 5, 300, 7)}
        await asyncio.sleep(0.01)
        tasks[7].cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert order == [5, 300, 900]


@pytest.mark.parametrize("gone_after", [0.1, 0.5])
async def test_a_reader_that_gives_up_is_no_server_error(caplog, gone_after, tmp_path: Path):
    """A reader that goes away before its response starts (a hedged read that
    lost its race) or while it is being sent (a stripe read's idle timeout):
    no server error, and the holder keeps serving."""
    size = 16 * 1024 * 1024
    app = peer_app(holding(tmp_path, bytes(size), 0.3), Metrics(), None)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"GET /peer/v1/blobs/{DIGEST} HTTP/1.1\r\nHost: x\r\n"
                     f"Range: bytes=0-{size - 1}\r\n\r\n".encode())
        await writer.drain()
        await asyncio.sleep(gone_after)                 # the holder reads (0.3 s), then sends…
        writer.transport.abort()                        # …and the reader is gone
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as session:
            assert (await _get(session, server, bulk=False))[0] == 206
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
    finally:
        await server.close()


async def test_a_reset_between_headers_and_body_is_no_server_error(caplog, monkeypatch, tmp_path: Path):
    """The reader resets after the holder sent the headers: the body's write
    meets a closing transport (aiohttp raises ConnectionResetError). aiohttp
    cancels a handler whose reader left while it worked, so only a reset that
    lands between the two writes gets here; the test closes the transport
    right after the headers to make that race certain."""
    size = 1024 * 1024
    app = peer_app(holding(tmp_path, bytes(size)), Metrics(), None)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    prepare = web.StreamResponse.prepare
    resets = []

    async def prepare_then_reset(self, request):
        writer = await prepare(self, request)
        if not resets:
            resets.append(request)
            request.transport.close()
        return writer

    monkeypatch.setattr(web.StreamResponse, "prepare", prepare_then_reset)
    try:
        async with aiohttp.ClientSession() as session:
            first = None
            with contextlib.suppress(aiohttp.ClientError):  # what reaches it is moot: it left
                first = (await _get(session, server, bulk=True))[0]
            assert resets
            assert (await _get(session, server, bulk=False))[0] == 206
            # The segment's one piece never reached that reader: it is handed out
            # again, to aiohttp's own retry of the request or to the next one.
            assert (first, (await _get(session, server, bulk=True))[0]) in ((206, 204), (None, 206))
            assert (await _get(session, server, bulk=True))[0] == 204
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
    finally:
        await server.close()


def test_a_publisher_leaves_the_next_lease_to_a_node_that_fetched_nothing():
    meta = SegmentMeta(0, b"d4:infode", "a", "00" * 20)
    record = BlobRecord(DIGEST, 4 * MiB, MiB, MiB // 4, 1, {0: meta})

    def peer(node: str, fetching: bool = True) -> Peer:
        return Peer(node, "10.0.0.1", 6881, None, {}, False, (), fetching)

    assert leaves_lease_to_others("a", record, [peer("b")])
    assert not leaves_lease_to_others("b", record, [peer("a")])          # fetched nothing yet
    assert not leaves_lease_to_others("a", record, [peer("b", fetching=False)])
    assert not leaves_lease_to_others("a", record, [])                   # nobody else: claim it


def add_seeded_segment(swarm: Swarm, tmp_path, index: int) -> None:
    directory = tmp_path / str(index)
    directory.mkdir()
    (directory / str(index)).write_bytes(bytes(PIECE))
    metainfo = make_metainfo(index, PIECE, PIECE, [hashlib.sha1(bytes(PIECE)).digest()])
    swarm.add_segment((DIGEST, index), metainfo, directory, seed=True)


@contextlib.asynccontextmanager
async def started_swarm():
    swarm = Swarm("127.0.0.1:0", Metrics())
    await swarm.start()
    try:
        yield swarm
    finally:
        await swarm.close()


async def test_a_blob_cap_is_shared_by_its_segments(tmp_path):
    async with started_swarm() as swarm:
        for index in range(4):
            add_seeded_segment(swarm, tmp_path, index)
            if index == 1:
                swarm.limit(DIGEST, 400_000)       # segments added later share it too
        limits = [h.download_limit() for h in swarm._handles.values()]
        assert limits == [100_000] * 4
        swarm.limit(DIGEST, 0)
        assert all(h.download_limit() <= 0 for h in swarm._handles.values())


async def test_held_uploads_stay_under_the_blob_cap_and_lift(tmp_path):
    async with started_swarm() as swarm:
        for index in range(4):
            add_seeded_segment(swarm, tmp_path, index)

        def uploads() -> list[int]:
            return [max(h.upload_limit(), 0) for h in swarm._handles.values()]
        swarm.hold_uploads([(DIGEST, 0), (DIGEST, 1)], 50_000)
        assert uploads() == [50_000, 50_000, 0, 0]
        swarm.limit(DIGEST, 400_000)
        assert uploads() == [50_000, 50_000, 100_000, 100_000]
        swarm.hold_uploads([(DIGEST, 0)], 1)         # a trickle, not a stop
        assert uploads()[0] == MIN_RATE
        swarm.hold_uploads([(DIGEST, 0), (DIGEST, 1)], 0)
        assert uploads() == [100_000] * 4
        swarm.limit(DIGEST, 0)
        assert uploads() == [0] * 4


class CountingTracker:
    """Answers `peers` slowly, with one holder of segment 0, and counts the calls."""

    def __init__(self, http: str) -> None:
        self.http = http
        self.calls = 0

    async def peers(self, digest: str, **kw) -> list[Peer]:
        self.calls += 1
        await asyncio.sleep(0.05)
        return [Peer("holder", "10.0.0.1", 6881, self.http, {}, complete=False, segments=(0,))]


async def test_a_prefetched_holder_lookup_serves_the_first_read():
    """The lookup started beside the blob record is the one the first read uses."""
    tracker = CountingTracker("http://127.0.0.1:9")
    reader = PeerReader(tracker, "me", None, Metrics(), None)  # type: ignore[arg-type]
    digest = Digest.parse("sha256:" + "ab" * 32)
    try:
        reader.prefetch(digest, 0)
        impatient = asyncio.create_task(reader.holders(digest, 0))
        await asyncio.sleep(0.01)
        impatient.cancel()  # a reader that gives up does not cancel the shared lookup
        assert await reader.holders(digest, 0) == ["http://127.0.0.1:9"]
        assert await reader.holders(digest, 0) == ["http://127.0.0.1:9"]  # cached
        assert tracker.calls == 1
    finally:
        await reader.close()


async def test_bulk_waits_for_a_quiet_spell_after_urgent_reads():
    holds = Holds()
    with holds.held():
        waiter = asyncio.create_task(holds.wait_free(timeout=5, quiet=0.1))
        await asyncio.sleep(0.05)
        assert not waiter.done()
    released = time.monotonic()
    await waiter
    assert time.monotonic() - released >= 0.09  # not at the release: a quiet spell after it
    started = time.monotonic()
    with holds.held():
        await holds.wait_free(timeout=0.2, quiet=0.1)  # still bounded by the timeout
    assert 0.15 < time.monotonic() - started < 1
    started = time.monotonic()
    await holds.wait_free(timeout=0.1, quiet=1.0)  # freed just now: waits out the timeout, no more
    assert 0.09 < time.monotonic() - started < 0.5


async def _peer(lookup=None) -> TestServer:
    """A peer HTTP server answering from `lookup` (see `holding`), or holding nothing."""
    server = TestServer(peer_app(lookup or (lambda digest, start, end: None), Metrics(), None),
                        host="127.0.0.1")
    await server.start_server()
    return server


async def test_a_hedged_read_takes_the_first_complete_answer(caplog, tmp_path: Path):
    """The holder is slow; another downloader has the piece: it wins, and the
    holder's abandoned answer is no error there. Another that lacks the piece
    (404) does not end the read: the holder's answer still counts."""
    holder = await _peer(holding(tmp_path, b"h" * 1000, 0.6))
    other = await _peer(holding(tmp_path, b"o" * 1000))
    lacking = await _peer()
    url = lambda s: f"http://127.0.0.1:{s.port}"  # noqa: E731
    metrics = Metrics()
    reader = PeerReader(CountingTracker(url(holder)), "me", None, metrics, None)  # type: ignore[arg-type]
    digest = Digest.parse(DIGEST)

    def hedges() -> dict[str, float]:
        return {w: metrics.read_hedges.labels(w)._value.get() for w in HEDGE_WINNERS}
    try:
        started = time.monotonic()
        data = await reader.read(digest, 0, 1000, segment=0, others=lambda: [url(other)])
        assert data == b"o" * 1000 and time.monotonic() - started < 0.5
        await asyncio.sleep(0.7)  # the holder has answered the read that was dropped
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        data = await reader.read(digest, 0, 1000, segment=0, others=lambda: [url(lacking)])
        assert data == b"h" * 1000
        assert await reader.read(digest, 0, 1000, segment=0) == b"h" * 1000  # no hedge asked
        assert hedges() == {"holder": 1, "other": 1, "none": 0}
    finally:
        await reader.close()
        for server in (holder, other, lacking):
            await server.close()


async def test_hedges_go_out_in_rounds_while_the_holder_has_not_answered(tmp_path: Path):
    """Nobody else is known at the first round, and the first downloader asked
    lacks the piece (404); a later round asks one that has it, which wins."""
    holder = await _peer(holding(tmp_path, b"h" * 1000, 1.5))
    lacking = await _peer()
    other = await _peer(holding(tmp_path, b"o" * 1000))
    url = lambda s: f"http://127.0.0.1:{s.port}"  # noqa: E731
    reader = PeerReader(CountingTracker(url(holder)), "me", None, Metrics(), None)  # type: ignore[arg-type]
    known: list[list[str]] = [[], [url(lacking)], [url(lacking), url(other)]]
    calls = []

    def others() -> list[str]:
        calls.append(time.monotonic())
        return known[min(len(calls) - 1, len(known) - 1)]
    try:
        started = time.monotonic()
        data = await reader.read(Digest.parse(DIGEST), 0, 1000, segment=0, others=others)
        assert data == b"o" * 1000 and time.monotonic() - started < 1.0
        assert len(calls) >= 3  # one look per round, until the answer
    finally:
        await reader.close()
        for server in (holder, lacking, other):
            await server.close()


def holding_short(tmp_path: Path, data: bytes, size: int):
    """A lookup that claims `size` bytes while the file on disk has only `data`
    (a file truncated under the holder)."""
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    segment_path(directory, 0).write_bytes(data)
    return lambda digest, start, end: (lambda: SegmentReader(directory, Geometry(size, size, size)),
                                       size)


async def test_a_holder_whose_file_falls_short_aborts_instead_of_stalling_the_reader(tmp_path: Path):
    """sendfile stops quietly at the end of a file: the holder must notice the
    missing bytes and drop the connection, so the reader fails at once rather
    than waiting out its read timeout on a body that never completes."""
    holder = await _peer(holding_short(tmp_path, b"s" * 400, 1000))
    reader = PeerReader(CountingTracker(f"http://127.0.0.1:{holder.port}"), "me", None,  # type: ignore[arg-type]
                        Metrics(), None)
    try:
        started = time.monotonic()
        assert await reader.read(Digest.parse(DIGEST), 0, 1000, segment=0) is None
        assert time.monotonic() - started < 1.0
    finally:
        await reader.close()
        await holder.close()


class OneHolder:
    """A holder's app stand-in: each segment's pieces lowest first, 10 ms a read;
    records how many reads each segment had in flight when one began."""

    def __init__(self) -> None:
        self.next: collections.Counter[int] = collections.Counter()
        self.inflight: collections.Counter[int] = collections.Counter()
        self.began: list[tuple[int, dict[int, int]]] = []

    async def holders(self, digest: Digest, index: int) -> list[str]:
        return ["holder"]

    async def handout(self, digest: Digest, index: int, span: Span, have: bytes) -> Handout:
        self.inflight[index] += 1
        self.began.append((index, {i: n for i, n in self.inflight.items() if n}))
        try:
            await asyncio.sleep(0.01)
        finally:
            self.inflight[index] -= 1
        piece = self.next[index]
        if piece >= span.pieces:
            return Handout(None)
        self.next[index] += 1
        return Handout(piece, b"x")


async def test_the_lowest_segment_takes_both_reads_once_the_first_piece_is_on_disk(tmp_path: Path):
    """Until the blob's first piece is on disk each segment has one reader (the
    holder's two slots serve segments 0 and 1); then segment 0 takes both."""
    geometry = Geometry(size=2 * 6 * PIECE, segment_size=6 * PIECE, piece_size=PIECE)
    download = Download(Digest.parse(DIGEST), tmp_path)
    download.set_geometry(geometry)

    class Landing:  # libtorrent stand-in: a handed-out piece is on disk at once
        def add_piece(self, key: tuple[str, int], piece: int, data: bytes) -> None:
            first = key[1] * 6 + piece
            download.mark_pieces(first, first + 1)

    holder = OneHolder()
    stripes = Stripes(Landing(), holder, download, geometry)  # type: ignore[arg-type]
    stripes.start(0)
    stripes.start(1)
    while stripes.active(0) or stripes.active(1):
        await asyncio.sleep(0.01)
    assert download.written == geometry.size  # every piece, each handed out once
    first_read_of_0 = holder.began[0]
    assert first_read_of_0 == (0, {0: 1}), holder.began
    later = [inflight for index, inflight in holder.began[2:] if index == 0]
    assert {0: 2} in later, f"segment 0 never had both reads: {holder.began}"
