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
from fleetp2p.fetch.download import Download
from fleetp2p.fetch.receive import receive
from fleetp2p.metrics import Metrics
from fleetp2p.oci.reference import Digest
from fleetp2p.store import BlobStore, Geometry, SegmentReader, SegmentWriter, StoredBlob
from fleetp2p.upstream import UpstreamClient

log = logging.getLogger(__name__)


class BlobSource(Protocol):
    size: int

    def reader(self) -> SegmentReader: ...

    async def wait_readable(self, position: int) -> int: ...

    def label_at(self, offset: int) -> str:
        """Metrics source of the byte at `offset`: local, upstream or peer."""
        ...


class LocalSource:
    def __init__(self, entry: StoredBlob) -> None:
        self.entry = entry
        self.size = entry.size

    def reader(self) -> SegmentReader:
        return self.entry.reader()

    async def wait_readable(self, position: int) -> int:
        return self.size

    def label_at(self, offset: int) -> str:
        return "local"


class DownloadSource:
    def __init__(self, download: Download) -> None:
        self.download = download
        self.size = download.size

    def reader(self) -> SegmentReader:
        return self.download.reader()

    async def wait_readable(self, position: int) -> int:
        return await self.download.wait_readable(position)

    def label_at(self, offset: int) -> str:
        return self.download.label_at(offset)


class BlobFetcher:
    def __init__(self, store: BlobStore, upstream: UpstreamClient, metrics: Metrics,
                 geometry: Callable[[int], Geometry] = Geometry.for_size) -> None:
        self.store = store
        self.geometry = geometry
        self.upstream = upstream
        self.metrics = metrics
        self._inflight: dict[Digest, Download] = {}

    def local(self, digest: Digest) -> LocalSource | None:
        entry = self.store.get(digest)
        return LocalSource(entry) if entry is not None else None

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
        """Make sure the blob is in the store (seed, pull)."""
        source = await self.open(registry, repository, digest)
        if isinstance(source, DownloadSource):
            await source.wait_readable(source.size)
        entry = self.store.get(digest)
        if entry is None:
            raise VerificationError(f"{digest} vanished from the store right after its fetch")
        return entry

    def _start(self, registry: str, repository: str, digest: Digest) -> Download:
        download = Download(digest, self.store.path_for(digest))
        self._inflight[digest] = download
        self.metrics.inflight.inc()
        download.task = asyncio.create_task(self._run(download, registry, repository),
                                            name=f"fetch {digest}")
        return download

    async def _run(self, download: Download, registry: str, repository: str) -> None:
        writer: SegmentWriter | None = None
        try:
            stream = await self.upstream.open_blob(registry, repository, download.digest)
            try:
                if self.store.needs_gc(stream.size):
                    await asyncio.to_thread(self.store.gc, stream.size, frozenset(self._inflight))
                writer = self.store.new_partial(download.digest, self.geometry(stream.size))
                download.set_geometry(writer.geometry)
                hasher = hashlib.new(download.digest.algorithm)

                def write(data: bytearray, offset: int) -> None:
                    writer.pwrite(data, offset)
                    hasher.update(data)

                await receive(stream.chunks(), write, 0, download.advance)
            finally:
                await stream.close()
            if hasher.hexdigest() != download.digest.hex:
                self.metrics.verification_failures.labels("blob").inc()
                raise VerificationError(f"upstream bytes for {download.digest} hash to "
                                        f"{download.digest.algorithm}:{hasher.hexdigest()}")
            await asyncio.to_thread(self.store.commit, writer, download.digest)
            writer = None
            download.finish()
            log.info("fetched %s (%d bytes) from %s/%s", download.digest, download.size, registry,
                     repository)
        except BaseException as e:
            if writer is not None:
                await asyncio.to_thread(writer.discard)
            download.fail(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            log.warning("fetch of %s failed: %s", download.digest, e)
        finally:
            self._inflight.pop(download.digest, None)
            self.metrics.inflight.dec()
