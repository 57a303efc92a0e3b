"""Stripes (fleetp2p/fetch/stripes.py) and the rules around them:
ownership every member agrees on, bulk reads yielding to urgent ones, lease rotation
and blob-wide rate caps. The whole path
through real libtorrent swarms runs in test_swarm_fetch.py and tests/fleet."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from fleetp2p.fetch.cooperative import leaves_lease_to_others
from fleetp2p.fetch.download import Download
from fleetp2p.fetch.stripes import Slots, owner, scarce, share_of
from fleetp2p.metrics import HEDGE_WINNERS, Metrics
from fleetp2p.oci.reference import Digest
from fleetp2p.peering.holds import Holds
from fleetp2p.peering.peerhttp import BULK_HEADER, PeerReader, _left, peer_app
from fleetp2p.store import Geometry
from fleetp2p.swarm import Swarm, make_metainfo
from fleetp2p.swarm.session import MIN_RATE
from tracker.models import BlobRecord, MiB, Peer, SegmentMeta

DIGEST = "sha256:" + "ab" * 32
PIECE = 64 * 1024


def test_every_member_computes_the_same_owner_and_shares_are_even():
    members = {f"node{i}" for i in range(15)}
    owners = [owner(DIGEST, 0, piece, members) for piece in range(3000)]
    assert owners == [owner(DIGEST, 0, piece, set(sorted(members))) for piece in range(3000)]
    counts = Counter(owners)
    assert set(counts) == members and max(counts.values()) < 2 * min(counts.values())


def test_a_newcomer_takes_pieces_only_from_others_shares():
    members = {f"node{i}" for i in range(8)}
    before = [owner(DIGEST, 3, piece, members) for piece in range(2000)]
    after = [owner(DIGEST, 3, piece, members | {"late"}) for piece in range(2000)]
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert moved and all(a == "late" for _, a in moved)


def test_shares_partition_a_segment():
    members = frozenset(f"node{i}" for i in range(7))
    shares = [share_of(DIGEST, 2, 500, members, m) for m in sorted(members)]
    assert sorted(p for share in shares for p in share) == list(range(500))


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


class SlowReader:
    """A segment reader whose reads take a while, like a busy disk."""

    def __init__(self, delay: float, fill: bytes = b"\0") -> None:
        self.delay = delay
        self.fill = fill

    def read(self, offset: int, count: int) -> bytes:
        time.sleep(self.delay)
        return self.fill * count

    def close(self) -> None:
        pass


async def _get(session: aiohttp.ClientSession, server: TestServer, bulk: bool) -> tuple[int, float]:
    headers = {"Range": "bytes=0-99", **({BULK_HEADER: "1"} if bulk else {})}
    async with session.get(server.make_url(f"/peer/v1/blobs/{DIGEST}"), headers=headers) as resp:
        await resp.read()
        return resp.status, asyncio.get_running_loop().time()


async def test_bulk_reads_wait_for_urgent_ones():
    app = peer_app(lambda digest, start, end: (lambda: SlowReader(0.3), 1000), Metrics(), None)
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
async def test_a_reader_that_gives_up_is_no_server_error(caplog, gone_after):
    """A reader that goes away before its response starts (a hedged read that
    lost its race) or while it is being sent (a stripe read's idle timeout):
    no server error, and the holder keeps serving."""
    size = 16 * 1024 * 1024
    app = peer_app(lambda digest, start, end: (lambda: SlowReader(0.3), size), Metrics(), None)
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


async def test_a_reset_between_headers_and_body_is_no_server_error(caplog, monkeypatch):
    """The reader resets after the holder sent the headers: the body's write
    meets a closing transport (aiohttp raises ConnectionResetError). aiohttp
    cancels a handler whose reader left while it worked, so only a reset that
    lands between the two writes gets here; the test closes the transport
    right after the headers to make that race certain."""
    size = 1024 * 1024
    app = peer_app(lambda digest, start, end: (lambda: SlowReader(0), size), Metrics(), None)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    prepare = web.Response.prepare
    resets = []

    async def prepare_then_reset(self, request):
        writer = await prepare(self, request)
        if not resets:
            resets.append(request)
            request.transport.close()
        return writer

    monkeypatch.setattr(web.Response, "prepare", prepare_then_reset)
    try:
        async with aiohttp.ClientSession() as session:
            with contextlib.suppress(aiohttp.ClientError):  # what reaches it is moot: it left
                await _get(session, server, bulk=True)
            assert resets
            assert (await _get(session, server, bulk=False))[0] == 206
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
        impatient = asyncio.create_task(reader._holders(digest, 0))
        await asyncio.sleep(0.01)
        impatient.cancel()  # a reader that gives up does not cancel the shared lookup
        assert await reader._holders(digest, 0) == ["http://127.0.0.1:9"]
        assert await reader._holders(digest, 0) == ["http://127.0.0.1:9"]  # cached
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


async def _peer(reader: SlowReader | None) -> TestServer:
    """A peer HTTP server holding a 1 MiB blob (or nothing, when `reader` is None)."""
    def lookup(digest, start, end):
        return None if reader is None else (lambda: reader, 1024 * 1024)
    server = TestServer(peer_app(lookup, Metrics(), None), host="127.0.0.1")
    await server.start_server()
    return server


async def test_a_hedged_read_takes_the_first_complete_answer(caplog):
    """The holder is slow; another downloader has the piece: it wins, and the
    holder's abandoned answer is no error there. Another that lacks the piece
    (404) does not end the read: the holder's answer still counts."""
    holder = await _peer(SlowReader(0.6, b"h"))
    other = await _peer(SlowReader(0.0, b"o"))
    lacking = await _peer(None)
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
