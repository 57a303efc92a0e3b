"""Where a blob's bytes come from, in order: the local store, then (with the
swarm) peers, then the upstream registry.

Whatever the source, a request gets a `BlobSource`: a size, a file to send
from, and `wait_readable()` telling how far it may read. Concurrent requests
for one digest share one `Download` (singleflight), which keeps running when
the request that started it goes away: the next one finds it in the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Protocol

from fleetp2p.errors import VerificationError
from fleetp2p.fetch.cooperative import CooperativeFetch, Fleet
from fleetp2p.fetch.download import Download, DownloadFailed
from fleetp2p.fetch.receive import receive
from fleetp2p.peering.timed import timed
from fleetp2p.metrics import Metrics
from fleetp2p.oci.reference import Digest
from fleetp2p.store import BlobStore, Geometry, SegmentReader, SegmentWriter, StoredBlob
from fleetp2p.store.pagecache import CacheReleaser
from fleetp2p.store.partials import Record
from fleetp2p.upstream import UpstreamBlob, UpstreamClient
from tracker.errors import TrackerError, TrackerUnavailable
from tracker.models import BlobRecord

log = logging.getLogger(__name__)

HASH_CHUNK = 8 * 1024 * 1024
# The in-order prefix grows a piece at a time; hashing it per piece cost a
# thread hop per 128 KiB (2048 per 256 MiB blob, on every node of a herd).
HASH_BATCH = 4 * 1024 * 1024


class BlobSource(Protocol):
    size: int
    # Its files are being written right now (a download in flight): opening one
    # finds its inode in memory, so the event loop may do it. A thread hop costs
    # more than the open on a loaded machine (up to 55 ms before a client's first
    # byte on the fleet bench). A stored blob's files may be cold on disk.
    hot: bool

    def reader(self) -> SegmentReader: ...

    async def wait_readable(self, position: int, want: int = 1) -> int: ...

    def label_at(self, offset: int) -> str:
        """Metrics source of the byte at `offset`: local, upstream or peer."""
        ...

    async def stored(self) -> None:
        """After the last byte: wait until the blob is committed to the store."""
        ...


class LocalSource:
    hot = False

    def __init__(self, entry: StoredBlob) -> None:
        self.entry = entry
        self.size = entry.size

    def reader(self) -> SegmentReader:
        return self.entry.reader()

    async def wait_readable(self, position: int, want: int = 1) -> int:
        return self.size

    def label_at(self, offset: int) -> str:
        return "local"

    async def stored(self) -> None:
        return None


class DownloadSource:
    hot = True

    def __init__(self, download: Download) -> None:
        self.download = download
        self.size = download.size
        # joined after verification, while the commit finishes: these bytes are local
        self.local = download.verified

    def reader(self) -> SegmentReader:
        return self.download.reader()

    async def wait_readable(self, position: int, want: int = 1) -> int:
        return await self.download.wait_readable(position, want)

    def label_at(self, offset: int) -> str:
        return "local" if self.local else self.download.label_at(offset)

    async def stored(self) -> None:
        # The last byte goes out once verified; the fsync and marker follow.
        if self.download.task is not None:
            await asyncio.wait([self.download.task])


class BlobFetcher:
    def __init__(self, store: BlobStore, upstream: UpstreamClient, metrics: Metrics,
                 geometry: Callable[[int], Geometry] = Geometry.for_size,
                 fleet: Fleet | None = None, swarm_min_size: int = 1,
                 release_page_cache: bool = False) -> None:
        self.store = store
        self.geometry = geometry
        self.fleet = fleet
        self.swarm_min_size = swarm_min_size
        self.release_page_cache = release_page_cache  # see store/pagecache.py
        self.upstream = upstream
        self.metrics = metrics
        self._inflight: dict[Digest, Download] = {}

    def local(self, digest: Digest) -> LocalSource | None:
        entry = self.store.get(digest)
        return LocalSource(entry) if entry is not None else None

    def is_inflight(self, digest: Digest) -> bool:
        return digest in self._inflight

    def download(self, digest: Digest) -> Download | None:
        return self._inflight.get(digest)

    def inflight(self) -> list[Download]:
        return list(self._inflight.values())

    async def open(self, registry: str, repository: str, digest: Digest) -> BlobSource:
        """A source for the blob; waits only until its size is known."""
        local = self.local(digest)
        if local is not None:
            return local
        download = self._inflight.get(digest)
        if download is not None:
            self.metrics.coalesced.labels("blob").inc()
        else:
            download = self._start(registry, repository, digest)
        self.metrics.waiters.inc()
        try:
            await download.ready()
        finally:
            self.metrics.waiters.dec()
        return DownloadSource(download)

    async def size(self, registry: str, repository: str, digest: Digest) -> int:
        """Size without fetching the blob (for HEAD)."""
        local = self.local(digest)
        if local is not None:
            return local.size
        download = self._inflight.get(digest)
        if download is not None and download.size >= 0:
            return download.size
        return await self.upstream.blob_size(registry, repository, digest)

    async def fetch(self, registry: str, repository: str, digest: Digest) -> StoredBlob:
        """Make sure the blob is in the store (seed, pull). A fleet copy that fails
        verification is refetched from upstream; that second attempt is waited for."""
        for attempt in range(2):
            source = await self.open(registry, repository, digest)
            if not isinstance(source, DownloadSource):
                break
            try:
                await source.wait_readable(source.size)
                await source.stored()
                break
            except DownloadFailed:
                if attempt or not self.is_inflight(digest):
                    raise
        entry = self.store.get(digest)
        if entry is None:
            raise VerificationError(f"{digest} vanished from the store right after its fetch")
        return entry

    def _start(self, registry: str, repository: str, digest: Digest,
               use_fleet: bool = True) -> Download:
        download = Download(digest, self.store.path_for(digest))
        self._inflight[digest] = download
        self.metrics.inflight.inc()
        download.task = asyncio.create_task(self._run(download, registry, repository, use_fleet),
                                            name=f"fetch {digest}")
        return download

    async def _run(self, download: Download, registry: str, repository: str,
                   use_fleet: bool) -> None:
        """Local store → peers (segments under the tracker's coordination) → upstream."""
        refetch = False
        try:
            record = await self._swarm_record(download.digest, registry, repository) \
                if use_fleet else None
            if record is not None:
                writer = await self._from_fleet(download, registry, repository, record)
                refetch = writer is None
                if writer is None:
                    raise VerificationError(f"the fleet's copy of {download.digest} failed "
                                            "verification; refetching from upstream")
            else:
                try:
                    writer = await self._from_upstream(download, registry, repository)
                except VerificationError:
                    refetch = download.resumed > 0  # the bytes kept on disk were bad
                    raise
            # Verified: clients may have the last byte now; the fsync and the
            # completion marker (what makes the blob count after a crash) follow.
            download.finish()
            try:
                await asyncio.to_thread(self.store.commit, writer, download.digest)
            except BaseException:
                await asyncio.to_thread(writer.discard)
                raise
            if record is not None and self.fleet is not None:
                self.fleet.announcer.hold_all(str(download.digest))
            log.info("fetched %s (%d bytes) for %s/%s", download.digest, download.size, registry,
                     repository)
        except BaseException as e:
            download.fail(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            log.warning("fetch of %s failed: %s", download.digest, e)
        finally:
            self._inflight.pop(download.digest, None)
            self.metrics.inflight.dec()
            if refetch:
                self._start(registry, repository, download.digest, use_fleet=False)

    async def _from_upstream(self, download: Download, registry: str,
                             repository: str) -> SegmentWriter:
        """The whole blob in one stream, hashed as it arrives. If an interrupted
        stream left bytes on disk, they are hashed again and upstream is asked
        for the rest only."""
        digest = download.digest
        kept = self.store.partials.peek(digest)
        stream: UpstreamBlob | None = None
        writer: SegmentWriter | None = None
        try:
            if kept is not None and kept.record.stream:
                geometry = kept.record.geometry
            else:
                stream = await self.upstream.open_blob(registry, repository, digest)
                geometry = self.geometry(stream.size)
            await self._make_room(geometry.size)
            writer = await asyncio.to_thread(self.store.new_partial, digest, geometry,
                                             Record(digest, geometry, stream=True))
            hasher = hashlib.new(digest.algorithm)
            start = await asyncio.to_thread(_hash_prefix, writer, hasher) if stream is None else 0
            if stream is None and start < geometry.size:  # else killed just before the commit
                stream = await self.upstream.open_blob(registry, repository, digest, start)
                if stream.size != geometry.size:
                    raise VerificationError(f"upstream says {digest} has {stream.size} bytes, "
                                            f"not {geometry.size}")
            download.set_geometry(geometry)
            releaser = self._releaser(download)
            if start:
                download.resumed = start
                download.advance(start)
                self.metrics.resumed_bytes.inc(start)
                log.info("%s: %d bytes were on disk; fetching the other %d from upstream", digest,
                         start, geometry.size - start)

            def write(data: bytes, offset: int) -> None:
                writer.pwrite(data, offset)
                hasher.update(data)

            def written(end: int) -> None:  # hashed too: the releaser may follow
                download.advance(end)
                releaser.passed(end)

            if stream is not None:
                await receive(stream.chunks(), write, start, written)
            self._check_digest(download, hasher.hexdigest())
            self.metrics.fetched_bytes.labels("upstream").inc(geometry.size - start)
            self.metrics.segments.labels("upstream").inc(geometry.segments)
            return writer
        except VerificationError:
            if writer is not None:  # the bytes are wrong: nothing to resume
                await asyncio.to_thread(writer.discard)
            raise
        except BaseException:
            if writer is not None:  # interrupted: a later fetch resumes it
                await asyncio.to_thread(self.store.keep_partial, writer, digest)
            raise
        finally:
            if stream is not None:
                await stream.close()

    async def _from_fleet(self, download: Download, registry: str, repository: str,
                          record: BlobRecord) -> SegmentWriter | None:
        """Segments from peers and leased upstream ranges; None means "the
        fleet's copy was bad: fetch it from upstream yourself"."""
        assert self.fleet is not None
        await self._make_room(record.size)
        fetch = CooperativeFetch(self.fleet, download, registry, repository, record)
        verifier = asyncio.create_task(self._hash_in_order(download))
        try:
            writer = await fetch.run()
            actual = await verifier
        except BaseException:
            verifier.cancel()
            if fetch.writer is not None:  # interrupted: a later fetch resumes it
                await asyncio.to_thread(self.store.keep_partial, fetch.writer, download.digest)
            raise
        try:
            self._check_digest(download, actual)
            return writer
        except VerificationError as e:
            log.error("%s; withdrawing its segment metainfo", e)
            await self._withdraw(download.digest, fetch)
            self.fleet.swarm.remove_blob(str(download.digest))
            self.fleet.announcer.drop(str(download.digest))
            await asyncio.to_thread(writer.discard)
            return None

    async def _hash_in_order(self, download: Download) -> str:
        """Whole-blob digest, computed as the in-order prefix grows, in a thread."""
        hasher = hashlib.new(download.digest.algorithm)
        await download.ready()
        reader = download.reader()
        releaser = self._releaser(download)
        buffer: memoryview | None = None  # one for every chunk: no heap churn

        def hash_range(start: int, count: int) -> None:
            # Made here, in the worker thread, not on the loop: zeroing 8 MiB of
            # fresh pages cost every agent of the fleet bench 5-6 ms of page faults
            # on its event loop 30-120 ms into a download, while its clients
            # waited for their first byte (perf, warm phase).
            nonlocal buffer
            if buffer is None:
                buffer = chunk_buffer(HASH_CHUNK)
            _hash_range(reader, hasher, buffer, start, count)

        position = 0
        try:
            while position < download.size:
                written = await download.wait_written(position, HASH_BATCH)
                end = min(written, position + HASH_CHUNK)
                await asyncio.to_thread(hash_range, position, end - position)
                position = end
                releaser.passed(position)
        finally:
            reader.close()
        return hasher.hexdigest()

    def _releaser(self, download: Download) -> CacheReleaser:
        assert download.geometry is not None
        return CacheReleaser(download.directory, download.geometry,
                             enabled=self.release_page_cache)

    async def _withdraw(self, digest: Digest, fetch: CooperativeFetch) -> None:
        """Which segment is wrong cannot be known: withdraw every published one."""
        assert self.fleet is not None
        record = fetch.record
        try:
            record = await self.fleet.tracker.get_blob(str(digest)) or record
        except (TrackerUnavailable, TrackerError):
            pass
        for index, meta in record.segments.items():
            try:
                await self.fleet.tracker.withdraw(str(digest), index, info_hash=meta.info_hash)
            except (TrackerUnavailable, TrackerError):
                pass

    async def _swarm_record(self, digest: Digest, registry: str,
                            repository: str) -> BlobRecord | None:
        """The tracker's record of a blob worth swarming, or None to go upstream."""
        fleet = self.fleet
        if fleet is None or not fleet.announcer.reachable:
            return None
        if fleet.peer_reader is not None:
            fleet.peer_reader.prefetch(digest, 0)  # where a client's first byte comes from
        try:
            record = await timed(self.metrics, "get_blob",
                                 lambda: fleet.tracker.get_blob(str(digest)))
            if record is None:
                size = await self.upstream.blob_size(registry, repository, digest)
                if size < self.swarm_min_size:
                    return None
                geometry = self.geometry(size)
                record = await timed(self.metrics, "register", lambda: fleet.tracker.register(
                    str(digest), size, segment_size=geometry.segment_size,
                    piece_size=geometry.piece_size))
        except (TrackerUnavailable, TrackerError) as e:
            log.warning("tracker unusable for %s (%s): fetching from upstream", digest, e)
            return None
        return record if record.size >= self.swarm_min_size else None

    async def _make_room(self, size: int) -> None:
        if self.store.needs_gc(size):
            await asyncio.to_thread(self.store.gc, size, frozenset(self._inflight))

    def _check_digest(self, download: Download, actual_hex: str) -> None:
        if actual_hex != download.digest.hex:
            self.metrics.verification_failures.labels("blob").inc()
            raise VerificationError(f"bytes for {download.digest} hash to "
                                    f"{download.digest.algorithm}:{actual_hex}")


def _hash_range(reader: SegmentReader, hasher: "hashlib._Hash", buffer: memoryview, start: int,
                count: int) -> None:
    """Blocking. One buffer for every chunk: no heap churn."""
    view = buffer[:count]
    if reader.read_into(start, view) != count:
        raise VerificationError(f"{reader.directory}: segment files shorter than written")
    hasher.update(view)


def chunk_buffer(size: int) -> memoryview:
    """A zeroed buffer for hashing chunks of a blob; its pages are touched here,
    so call it off the event loop."""
    return memoryview(bytearray(size))


def _hash_prefix(writer: SegmentWriter, hasher: "hashlib._Hash") -> int:
    """Feed the bytes an interrupted stream left on disk to `hasher`; returns how
    many. Blocking."""
    end = writer.stream_prefix()
    reader = SegmentReader(writer.directory, writer.geometry)
    buffer = chunk_buffer(min(HASH_CHUNK, max(end, 1)))
    try:
        for position in range(0, end, HASH_CHUNK):
            _hash_range(reader, hasher, buffer, position, min(HASH_CHUNK, end - position))
    finally:
        reader.close()
    return end
