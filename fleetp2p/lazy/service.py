"""Range reads of lazy layers (eStargz, zstd:chunked) without pulling the layer.

A range a client asks for is widened to the whole compressed chunks it
touches; each chunk is fetched once (from a peer that has it, else from
upstream by Range), decompressed and checked against its digest from the
TOC, whose own digest the verified manifest vouches for. Only then are the
bytes kept (in a sparse file per layer) and served. Bytes between chunks
(tar headers, gzip framing) carry no digest; they are served as fetched.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from fleetp2p.errors import FleetError, VerificationError
from fleetp2p.lazy.detect import LayerPlan
from fleetp2p.lazy.intervals import IntervalSet
from fleetp2p.lazy.toc import TOC, Chunk, LazyFormatError, TocLocation, decode_chunk
from fleetp2p.metrics import Metrics
from fleetp2p.oci.reference import Digest
from fleetp2p.store import Geometry, SegmentReader, SegmentWriter

log = logging.getLogger(__name__)

# Fetch = (start, end) → bytes of the blob; one per source, tried in order.
Fetch = Callable[[int, int], Awaitable[bytes | None]]
SPAN_CONCURRENCY = 4


class LazyBlob:
    """One lazily read layer on this node."""

    def __init__(self, digest: Digest, size: int, plan: LayerPlan, directory: Path,
                 metrics: Metrics) -> None:
        self.digest = digest
        self.size = size
        self.plan = plan
        self.metrics = metrics
        segment = 1 << max(14, (size - 1).bit_length()) if size > 1 else 1 << 14
        self.geometry = Geometry(size, segment, 1 << 14)
        self.directory = directory
        self.present = IntervalSet()
        self.from_peers = IntervalSet()  # for metrics: which present bytes came from peers
        self.toc: TOC | None = None
        self._spans: list[tuple[int, int]] = []  # compressed spans of chunks, sorted
        self._chunks: dict[tuple[int, int], list[Chunk]] = {}
        self._toc_lock = asyncio.Lock()
        self._inflight: dict[tuple[int, int], asyncio.Future] = {}
        self._writer = SegmentWriter(directory, self.geometry)
        self._writer.ensure_empty_blob()
        self.prefetched = False

    # Reading --------------------------------------------------------------

    def reader(self) -> SegmentReader:
        return SegmentReader(self.directory, self.geometry)

    async def ensure(self, ranges: list[tuple[int, int]], sources: list[tuple[str, Fetch]]) -> None:
        """Make every inclusive (first, last) range readable from disk, verified."""
        await self.load_toc(sources)
        wanted = IntervalSet()
        for first, last in ranges:
            start, end = self.widen(first, last + 1)
            wanted.add(start, end)
        gaps = [gap for start, end in wanted for gap in self.present.missing(start, end)]
        limit = asyncio.Semaphore(SPAN_CONCURRENCY)

        async def one(span: tuple[int, int]) -> None:
            async with limit:
                await self._fetch_once(span, sources)
        await asyncio.gather(*(one(span) for span in gaps))

    def widen(self, start: int, end: int) -> tuple[int, int]:
        """[start, end) grown to whole chunks: a chunk is verifiable only whole."""
        i = bisect.bisect_right(self._spans, (start, float("inf"))) - 1
        i = max(i, 0)
        while i < len(self._spans) and self._spans[i][0] < end:
            s, e = self._spans[i]
            if e > start:
                start, end = min(start, s), max(end, e)
            i += 1
        return start, min(end, self.size)

    # TOC ------------------------------------------------------------------

    async def load_toc(self, sources: list[tuple[str, Fetch]]) -> TOC:
        """Footer and TOC from the first source whose copy verifies: the TOC digest
        comes from the manifest, so a peer's copy is as good as upstream's."""
        async with self._toc_lock:
            if self.toc is not None:
                return self.toc
            failure: Exception | None = None
            for name, fetch in sources:
                try:
                    return await self._load_toc_from(name, fetch)
                except LazyFormatError as e:
                    failure = e
                    log.warning("TOC of %s from %s did not verify: %s", self.digest, name, e)
            raise failure or FleetError(f"cannot read the TOC of {self.digest}")

    async def _load_toc_from(self, name: str, fetch: Fetch) -> TOC:
        location = self.plan.location
        footer = None
        if location is None or location.end is None:
            start, end = self.plan.first_range(self.size)
            footer = (start, await self._fetch_raw(start, end, name, fetch))
            location = self.plan.parse_footer(footer[1], self.size)
        if location.end is None:
            raise LazyFormatError("the layer's footer does not say where its TOC ends")
        toc_bytes = await self._fetch_raw(location.offset, location.end, name, fetch)
        toc = await asyncio.to_thread(self.plan.parse_toc, toc_bytes, location)
        # Verified now: keep footer and TOC, clients read them too.
        await self._keep(location.offset, toc_bytes, name)
        if footer is not None:
            await self._keep(footer[0], footer[1], name)
        self._index(toc, location)
        self.toc = toc
        return toc

    def _index(self, toc: TOC, location: TocLocation) -> None:
        for entry in toc.entries:
            for chunk in entry.chunks:
                if chunk.zeros or chunk.compressed_end is None:
                    continue
                self._chunks.setdefault((chunk.compressed_offset, chunk.compressed_end),
                                        []).append(chunk)
        self._spans = sorted(self._chunks)

    # Fetching -------------------------------------------------------------

    async def _fetch_once(self, span: tuple[int, int], sources: list[tuple[str, Fetch]]) -> None:
        fut = self._inflight.get(span)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[span] = fut
        try:
            await self._fetch_verified(span, sources)
            fut.set_result(None)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()
            raise
        finally:
            del self._inflight[span]

    async def _fetch_verified(self, span: tuple[int, int], sources: list[tuple[str, Fetch]]) -> None:
        start, end = span
        for name, fetch in sources:
            data = await fetch(start, end)
            if data is None or len(data) != end - start:
                continue
            try:
                await asyncio.to_thread(self._verify, start, data)
            except LazyFormatError as e:
                self.metrics.verification_failures.labels("chunk").inc()
                log.warning("%s bytes %d-%d of %s failed verification: %s", name, start, end,
                            self.digest, e)
                if name == "upstream":
                    raise VerificationError(f"upstream bytes {start}-{end} of {self.digest} "
                                            f"failed their chunk digest: {e}") from None
                continue
            self.metrics.lazy_fetched_bytes.labels(name).inc(len(data))
            await self._keep(start, data, name)
            return
        raise FleetError(f"no source could provide bytes {start}-{end} of {self.digest}")

    def _verify(self, start: int, data: bytes) -> None:
        """Every chunk inside the span decodes to its digest. Blocking (CPU)."""
        end = start + len(data)
        i = bisect.bisect_left(self._spans, (start, -1))
        while i < len(self._spans) and self._spans[i][0] < end:
            s, e = self._spans[i]
            if s >= start and e <= end:
                for chunk in self._chunks[(s, e)]:
                    if chunk.digest is not None:
                        decode_chunk(self.plan.format, data[s - start:e - start], chunk)
            i += 1

    async def _fetch_raw(self, start: int, end: int, name: str, fetch: Fetch) -> bytes:
        """Bytes verified by what they contain (footer, TOC), not by chunk digests."""
        data = await fetch(start, end)
        if data is None or len(data) != end - start:
            raise LazyFormatError(f"{name} could not provide bytes {start}-{end}")
        self.metrics.lazy_fetched_bytes.labels(name).inc(len(data))
        return data

    async def _keep(self, start: int, data: bytes, source: str) -> None:
        await asyncio.to_thread(self._writer.pwrite, data, start)
        self.present.add(start, start + len(data))
        if source == "peer":
            self.from_peers.add(start, start + len(data))

    def close(self, remove: bool = True) -> None:
        self._writer.close()
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)
