"""Byte ranges between agents over plain HTTP: lazy reads, the first piece a
client waits for, and stripes (fetch/stripes.py).

A container blocked on a file read cannot wait for libtorrent's connection
tick (0.1–0.9 s); an HTTP range from a peer's agent takes milliseconds. The
bytes carry no trust: the reader verifies every chunk against the TOC, and
pieces against their published hash (libtorrent checks injected pieces); a
peer only serves what it holds verified (a complete blob, the finished pieces
of one it is fetching, or the verified parts of a lazily read one).
"""

from __future__ import annotations

import asyncio
import fcntl
import hmac
import logging
import random
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import aiohttp
from aiohttp import web

from fleetp2p.errors import FleetError
from fleetp2p.metrics import Metrics
from fleetp2p.oci.reference import Digest
from fleetp2p.peering.announcer import Announcer
from fleetp2p.peering.handouts import Handouts, Span
from fleetp2p.peering.holds import Holds
from fleetp2p.peering.openreaders import OpenReaders
from fleetp2p.peering.timed import timed
from fleetp2p.registry.ranges import parse_content_range, parse_range
from fleetp2p.registry.sendfile import send_file_range
from fleetp2p.store import BlobStore, SegmentReader
from tracker.client import TrackerClient
from tracker.errors import TrackerError, TrackerUnavailable

log = logging.getLogger(__name__)

PEER_TIMEOUT = 3.0  # without a byte moving: a busy holder is slow, not dead
PEERS_TTL = 5.0
MAX_PEER_RANGE = 64 * 1024 * 1024
PEERS_TO_TRY = 3
HEDGE_DELAY = 0.1  # seconds a hedged read waits for the holder before asking others too
HEDGES = 2
BULK_MAX_WAIT = 1.0
# First pieces come in bursts (a fleet's clients start together, their requests
# arrive over ~0.2 s): bulk reads wait until none was asked for this long, or
# each bulk response let in between delays every later first piece.
URGENT_QUIET = 0.05
# Responses a holder sends at once (per kind). A few flows fill any link;
# more only deepen the queue at its uplink, where new connections' handshakes
# are dropped (a 1 s SYN retry) and urgent reads wait behind bulk bytes.
BULK_SLOTS = 8
URGENT_SLOTS = 4
LEFT_POLL = 0.005         # seconds between looks at a socket's send queue
LEFT_SLACK = 16 * 1024    # unacknowledged bytes that count as "left"


@dataclass(frozen=True)
class Handout:
    """A holder's answer to a stripe reader: a piece of the segment, or None
    when it has handed out every piece the reader lacks."""

    piece: int | None
    data: bytes = b""


# (digest, start, end) → (open a reader, blob size) when this node holds those bytes verified.
Lookup = Callable[[Digest, int, int], "tuple[Callable[[], SegmentReader], int] | None"]


class PeerReader:
    """Client side: ask the holders the tracker knows for a byte range."""

    def __init__(self, tracker: TrackerClient, node_id: str, announcer: Announcer,
                 metrics: Metrics, token: str | None) -> None:
        self.tracker = tracker
        self.node_id = node_id
        self.announcer = announcer
        self.metrics = metrics
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None
        self._peers: dict[tuple[Digest, int | None], tuple[float, list[str]]] = {}
        self._lookups: dict[tuple[Digest, int | None], asyncio.Task] = {}

    def hold(self, digest: Digest) -> None:
        """A node holding part of a lazy layer is a (partial) holder of its segment 0."""
        self.announcer.hold_segment(str(digest), 0)

    async def read(self, digest: Digest, start: int, end: int, segment: int | None = None, *,
                   others: Callable[[], list[str]] | None = None) -> bytes | None:
        """The bytes from some holder (of `segment`, when given), unverified; None if
        no holder answered with all of them. `others`: agents that may have the
        bytes too (see `_race`)."""
        if end - start > MAX_PEER_RANGE:
            return None
        holders = (await self.holders(digest, segment))[:PEERS_TO_TRY]
        if not holders:
            log.debug("peer http: no holders of %s segment %s", digest, segment)
            return None
        if others is not None:
            data = await self._race(holders[0], others, digest, start, end)
            if data is not None:
                return data
            holders = holders[1:]
        for url in holders:
            data = await self._get(url, digest, start, end)
            if data is not None:
                return data
        return None

    async def handout(self, digest: Digest, segment: int, span: Span, have: bytes
                      ) -> "Handout | None":
        """A piece of the segment from one of its holders, picked by the holder
        (see handouts.py), unverified; None if no holder answered. These are
        bulk reads: a holder answers them after the reads a client is blocked on."""
        for url in (await self.holders(digest, segment))[:PEERS_TO_TRY]:
            handout = await self._take(url, digest, span, have)
            if handout is not None:
                return handout
        return None

    async def _race(self, holder: str, others: Callable[[], list[str]], digest: Digest,
                    start: int, end: int) -> bytes | None:
        """The holder first; while it has not answered, a few of `others` too
        every HEDGE_DELAY. A herd's clients all want the same first piece from
        one holder, whose uplink sends it to them one after another; whoever got
        it first can serve it meanwhile (an agent serves the pieces it has
        verified and answers 404 for the rest). The first complete answer wins.
        Rounds, not one hedge: in a herd `others` (the downloaders this node
        has heard of) is often still empty 100 ms in, and the downloaders that
        lack the piece at first have it a little later."""
        first = asyncio.create_task(self._get(holder, digest, start, end))
        tasks = {first}
        asked = {holder}
        hedged = False
        try:
            while tasks:
                done, tasks = await asyncio.wait(tasks, timeout=HEDGE_DELAY,
                                                 return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.result() is not None:
                        if hedged:
                            self.metrics.read_hedges.labels("holder" if task is first else "other").inc()
                        return task.result()
                if not first.done():
                    candidates = [url for url in others() if url not in asked]
                    hedges = random.sample(candidates, min(HEDGES, len(candidates)))
                    asked.update(hedges)
                    tasks |= {asyncio.create_task(self._get(url, digest, start, end))
                              for url in hedges}
                    hedged = hedged or bool(hedges)
            if hedged:
                self.metrics.read_hedges.labels("none").inc()
            return None
        finally:
            for task in tasks:
                task.cancel()

    def prefetch(self, digest: Digest, segment: int | None) -> None:
        """Look up the holders now, while the caller waits on the tracker for
        something else: the first read of a blob then skips a round trip, which
        under load is a good part of a client's time to first byte."""
        self._lookup(digest, segment)

    def _lookup(self, digest: Digest, segment: int | None) -> asyncio.Task:
        """One tracker call per (blob, segment) in flight, shared by every reader."""
        key = (digest, segment)
        task = self._lookups.get(key)
        if task is None:
            task = asyncio.create_task(self._ask_holders(digest, segment))
            self._lookups[key] = task

            def done(t: asyncio.Task) -> None:
                self._lookups.pop(key, None)
                if not t.cancelled() and t.exception() is not None:  # seen even if only prefetched
                    log.warning("looking up holders of %s: %r", digest, t.exception())
            task.add_done_callback(done)
        return task

    async def holders(self, digest: Digest, segment: int | None) -> list[str]:
        """Peer HTTP addresses of the holders the tracker knows (of `segment`, if
        given; any part of the blob if not), cached for a few seconds."""
        cached = self._peers.get((digest, segment))
        if cached is not None and time.monotonic() - cached[0] < PEERS_TTL:
            return cached[1]
        # shielded: a reader that gives up does not cancel the others' lookup
        return await asyncio.shield(self._lookup(digest, segment))

    async def _ask_holders(self, digest: Digest, segment: int | None) -> list[str]:
        try:
            peers = await timed(self.metrics, "peers", lambda: self.tracker.peers(
                str(digest), node=self.node_id, segment=segment, limit=10))
        except (TrackerUnavailable, TrackerError):
            return []
        urls = [p.http for p in peers if p.http and (
            p.has(segment) if segment is not None else p.complete or p.segments)]
        random.shuffle(urls)
        if urls:  # an empty answer is not cached: a holder may announce any moment
            self._peers[(digest, segment)] = (time.monotonic(), urls)
        return urls

    async def _get(self, base: str, digest: Digest, start: int, end: int) -> bytes | None:
        answer = await self._fetch(f"{base}/peer/v1/blobs/{digest}",
                                   {"Range": f"bytes={start}-{end - 1}"})
        if answer is None or answer[0] != 206:
            return None
        if len(answer[2]) != end - start:
            log.debug("peer http %s range %d-%d: %d bytes", base, start, end, len(answer[2]))
            return None
        return answer[2]

    async def _take(self, base: str, digest: Digest, span: Span, have: bytes) -> "Handout | None":
        answer = await self._fetch(
            f"{base}/peer/v1/blobs/{digest}/handout?start={span.start}&end={span.end}"
            f"&piece={span.piece}&have={have.hex()}", {})
        if answer is None:
            return None
        status, content_range, data = answer
        if status == 204:
            return Handout(None)
        bounds = parse_content_range(content_range) if status == 206 else None
        piece = span.piece_at(bounds[0], bounds[1] + 1) if bounds is not None else None
        if piece is None or len(data) != bounds[1] + 1 - bounds[0]:
            log.debug("peer http %s handout of %d-%d: HTTP %d, %s, %d bytes", base, span.start,
                      span.end, status, content_range, len(data))
            return None
        return Handout(piece, data)

    async def _fetch(self, url: str, headers: dict[str, str]) -> tuple[int, str, bytes] | None:
        """(status, Content-Range, body), or None if the peer could not be asked."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=PEER_TIMEOUT, sock_read=PEER_TIMEOUT))
        try:
            async with self._session.get(url, headers={**self._headers, **headers}) as resp:
                if resp.status not in (204, 206):
                    log.debug("peer http %s: HTTP %d", url, resp.status)
                    return None
                return resp.status, resp.headers.get("Content-Range", ""), await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            log.debug("peer http %s: %r", url, e)
            return None

    async def close(self) -> None:
        for task in list(self._lookups.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()


@dataclass(frozen=True)
class _Bytes:
    """A 206 answer: bytes [start, end) of a blob of `size`, from `opener`'s files."""

    opener: Callable[[], SegmentReader]
    start: int
    end: int
    size: int


def peer_app(lookup: Lookup, metrics: Metrics, token: str | None) -> web.Application:
    """Server side: the only routes other nodes can reach on this node's HTTP port."""
    secret = f"Bearer {token}".encode() if token else None
    urgent = Holds()  # range reads (a client is blocked on them) go before handouts (stripes)
    bulk_slots = asyncio.Semaphore(BULK_SLOTS)
    urgent_slots = asyncio.Semaphore(URGENT_SLOTS)
    handouts = Handouts()
    readers = OpenReaders()

    async def handle(request: web.Request) -> web.StreamResponse:
        """Few responses at a time, each until it has left: fifteen first pieces
        sent together all arrive at the end (fair share), sent a few at a time
        the median one arrives in half that time. Handouts wait while any range
        read is queued or sent."""
        with urgent.held():
            async with urgent_slots:
                response, _ = await send(request, serve_range(request))
                return response

    async def handle_handout(request: web.Request) -> web.StreamResponse:
        await urgent.wait_free(BULK_MAX_WAIT, URGENT_QUIET)  # bounded: bulk must not starve
        async with bulk_slots:
            # Picked only now, with the uplink free for it: a reader queued here
            # reserves nothing, and the pieces leave in the order they are handed.
            answer, handed = serve_handout(request)
            delivered = False
            try:
                response, delivered = await send(request, answer)
            finally:
                if handed is not None and not delivered:
                    handouts.give_back(*handed)
            return response

    async def send(request: web.Request, answer: web.Response | _Bytes
                   ) -> tuple[web.StreamResponse, bool]:
        """The response, and whether it reached the reader."""
        if isinstance(answer, web.Response):
            return answer, await sent(request, answer, [])
        with readers.reader(answer.opener) as reader:
            try:
                files = [(reader.opened(i) or await asyncio.to_thread(reader.file, i), within, n)
                         for i, within, n in reader.pieces(answer.start, answer.end - answer.start)]
            except OSError:  # an unfinished download went away meanwhile
                response = web.Response(status=404)
                return response, await sent(request, response, [])
            response = web.StreamResponse(status=206, headers={
                "Content-Range": f"bytes {answer.start}-{answer.end - 1}/{answer.size}",
                "Content-Type": "application/octet-stream"})
            response.content_length = answer.end - answer.start
            return response, await sent(request, response, files)

    async def sent(request: web.Request, response: web.StreamResponse,
                   files: list[tuple[BinaryIO, int, int]]) -> bool:
        """Sent (zero-copy from `files`: (file, offset, count)), and (nearly)
        acknowledged: a response holds the uplink until it has left, not until
        it is in the kernel's send buffer. False if the reader left first."""
        try:
            await response.prepare(request)
            for f, offset, count in files:
                # No page cache warming in a thread (registry/sendfile.py): answers
                # are single pieces, mostly read in order from files kept open, so
                # kernel readahead has them; a thread hop per piece made the fleet
                # bench slower (warm 27.1 and 28.2 s, cold 33.5 and 33.9 s, against
                # 25.4-26.5 and 31.7-32.9 s without).
                await send_file_range(request, response, f, offset, count, warm=False)
            await response.write_eof()
        except ConnectionError:
            # The reader reset between the headers and the body (a hedged read
            # that lost its race): aiohttp's "Cannot write to closing transport",
            # seen on the fleet bench, which it would log as a server error. A
            # reader gone earlier cancels this handler instead.
            return False
        except OSError as e:  # the file failed mid-way: a short body must not pass as whole
            log.warning("peer http %s: %s", request.path, e)
            if request.transport is not None:
                request.transport.abort()
            return False
        metrics.peer_served_bytes.inc(sum(count for _, _, count in files))
        return await _left(request.transport)

    def blob(request: web.Request) -> tuple[Digest, int] | web.Response:
        """The blob asked for and its size, if this node holds any of it."""
        if secret is not None and not hmac.compare_digest(
                request.headers.get("Authorization", "").encode(), secret):
            return web.Response(status=401)
        try:
            digest = Digest.parse(request.match_info["digest"])
        except FleetError:
            return web.Response(status=400)
        found = lookup(digest, 0, 0)
        return web.Response(status=404) if found is None else (digest, found[1])

    def serve_range(request: web.Request) -> web.Response | _Bytes:
        found = blob(request)
        if isinstance(found, web.Response):
            return found
        digest, size = found
        try:
            ranges = parse_range(request.headers.get("Range"), size)
        except FleetError:
            return web.Response(status=416)
        if not ranges or len(ranges) != 1 or ranges[0][1] - ranges[0][0] + 1 > MAX_PEER_RANGE:
            return web.Response(status=400)
        first, last = ranges[0]
        return held(digest, first, last + 1, size)

    def serve_handout(request: web.Request
                      ) -> tuple[web.Response | _Bytes, tuple[str, Span, int] | None]:
        """The next piece of a segment for a stripe reader (see handouts.py);
        204 when this node has handed out every piece the reader lacks."""
        found = blob(request)
        if isinstance(found, web.Response):
            return found, None
        digest, size = found
        query = request.query
        try:
            span = Span(int(query["start"]), int(query["end"]), int(query["piece"]))
            if span.end > size or span.piece > MAX_PEER_RANGE:
                raise ValueError(f"span {span} of a blob of {size} bytes")
            piece = handouts.take(str(digest), span, bytes.fromhex(query["have"]),
                                  lambda lo, hi: lookup(digest, lo, hi) is not None)
        except (KeyError, ValueError):
            return web.Response(status=400), None
        if piece is None:
            return web.Response(status=204), None
        return held(digest, *span.bounds(piece), size), (str(digest), span, piece)

    def held(digest: Digest, start: int, end: int, size: int) -> web.Response | _Bytes:
        found = lookup(digest, start, end)
        return web.Response(status=404) if found is None else _Bytes(found[0], start, end, size)

    async def close_readers(app: web.Application) -> None:
        readers.close()

    app = web.Application()
    app.router.add_get("/peer/v1/blobs/{digest}", handle)
    app.router.add_get("/peer/v1/blobs/{digest}/handout", handle_handout)
    app.on_cleanup.append(close_readers)
    return app


async def _left(transport: asyncio.WriteTransport | None, limit: float = PEER_TIMEOUT) -> bool:
    """Until the transport's buffer and the socket's send queue are (almost)
    empty: the bytes were acknowledged by the receiver. False if the reader
    closed or reset the connection first."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if transport is None or sock is None:
        return transport is not None and not transport.is_closing()
    deadline = time.monotonic() + limit
    buf = bytearray(4)
    while time.monotonic() < deadline:
        if transport.is_closing():  # the reader reset or closed it (a hedge that lost its race)
            return False
        try:
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
        except OSError:
            return False
        if int.from_bytes(buf, "little") + transport.get_write_buffer_size() <= LEFT_SLACK:
            return True
        await asyncio.sleep(LEFT_POLL)
    return True  # still queued: slow, not lost


def store_lookup(store: BlobStore, lazy_blob: Callable, download: Callable) -> Lookup:
    """Verified bytes this node has: a complete blob, the finished pieces of one
    it is still fetching (what a fleet swarms from a segment's first holder), or
    verified parts of a lazy one."""

    def lookup(digest: Digest, start: int, end: int):
        entry = store.get(digest)
        if entry is not None:
            return entry.reader, entry.size
        fetching = download(digest)
        if fetching is not None and fetching.size >= 0 and \
                (end <= start or fetching.covers(start, end)):
            return fetching.reader, fetching.size
        blob = lazy_blob(digest)
        if blob is not None and (end <= start or blob.present.covers(start, end)):
            return blob.reader, blob.size
        return None
    return lookup
