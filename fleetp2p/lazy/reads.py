"""The agent's lazy-read service: which layers are read lazily, and from where.

A range request for a layer that a manifest declared lazily readable, and
that is neither stored nor being pulled whole, is answered from its
`LazyBlob`; everything else takes the whole-blob path.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from fleetp2p.errors import UpstreamError
from fleetp2p.lazy.layers import LazyLayers
from fleetp2p.lazy.service import Fetch, LazyBlob
from fleetp2p.metrics import Metrics
from fleetp2p.oci.reference import Digest
from fleetp2p.peering.peerhttp import PeerReader
from fleetp2p.upstream import UpstreamClient

log = logging.getLogger(__name__)

# A range read this large is better served by pulling the whole layer.
WHOLE_FRACTION = 0.5


class LazySource:
    """A BlobSource over the verified parts of a lazy blob."""

    hot = False  # its parts may have been read long ago

    def __init__(self, blob: LazyBlob) -> None:
        self.blob = blob
        self.size = blob.size

    def reader(self):
        return self.blob.reader()

    async def wait_readable(self, position: int, want: int = 1) -> int:
        return self.size

    def label_at(self, offset: int) -> str:
        return "peer" if self.blob.from_peers.covers(offset, offset + 1) else "upstream"

    async def stored(self) -> None:
        return None  # lazily read bytes are a cache, never a stored blob


class LazyReads:
    def __init__(self, root: str | Path, layers: LazyLayers, upstream: UpstreamClient,
                 metrics: Metrics, prefetch: bool = True) -> None:
        self.root = Path(root) / "lazy"
        self.layers = layers
        self.upstream = upstream
        self.metrics = metrics
        self.prefetch = prefetch
        self.peers: PeerReader | None = None  # set when the node has a tracker
        self._blobs: dict[Digest, LazyBlob] = {}
        self._tasks: set[asyncio.Task] = set()

    def open_dir(self) -> None:
        """Lazy reads are a cache: start empty (blocking)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)

    def size_of(self, digest: Digest) -> int | None:
        known = self.layers.plan(str(digest))
        return known[1] if known else None

    def wants(self, digest: Digest, ranges: list[tuple[int, int]], size: int) -> bool:
        if self.layers.plan(str(digest)) is None:
            return False
        requested = sum(last - first + 1 for first, last in ranges)
        return requested < WHOLE_FRACTION * size

    def blob(self, digest: Digest) -> LazyBlob | None:
        return self._blobs.get(digest)

    async def open(self, registry: str, repository: str, digest: Digest,
                   ranges: list[tuple[int, int]]) -> LazySource:
        known = self.layers.plan(str(digest))
        assert known is not None
        plan, size = known
        blob = self._blobs.get(digest)
        if blob is None:
            made = await asyncio.to_thread(LazyBlob, digest, size, plan, self.root / digest.hex,
                                          self.metrics)
            blob = self._blobs.setdefault(digest, made)
            if blob is not made:  # another request made it meanwhile
                made.close(remove=False)
        self.metrics.lazy_requested_bytes.inc(sum(last - first + 1 for first, last in ranges))
        sources = self.sources(registry, repository, digest)
        await blob.ensure(ranges, sources)
        if self.peers is not None:
            self.peers.hold(digest)
        self._maybe_prefetch(blob, sources)
        return LazySource(blob)

    def sources(self, registry: str, repository: str, digest: Digest) -> list[tuple[str, Fetch]]:
        async def from_upstream(start: int, end: int) -> bytes | None:
            try:
                stream = await self.upstream.open_blob(registry, repository, digest, start, end)
            except UpstreamError as e:
                log.warning("upstream range %d-%d of %s: %s", start, end, digest, e)
                return None
            try:
                return b"".join([chunk async for chunk in stream.chunks()])
            finally:
                await stream.close()

        sources: list[tuple[str, Fetch]] = []
        if self.peers is not None:
            peers = self.peers

            async def from_peers(start: int, end: int) -> bytes | None:
                return await peers.read(digest, start, end)
            sources.append(("peer", from_peers))
        sources.append(("upstream", from_upstream))
        return sources

    def _maybe_prefetch(self, blob: LazyBlob, sources: list[tuple[str, Fetch]]) -> None:
        """`.prefetch.landmark`: what a container reads at start, fetched in the background."""
        if not self.prefetch or blob.prefetched or blob.toc is None:
            return
        blob.prefetched = True
        region = blob.toc.prefetch_range()
        if not region or region[1] <= region[0]:
            return

        async def run() -> None:
            try:
                await blob.ensure([(region[0], region[1] - 1)], sources)
                log.info("prefetched %d bytes of %s", region[1] - region[0], blob.digest)
            except Exception as e:  # background: a failure only costs the prefetch
                log.warning("prefetch of %s failed: %s", blob.digest, e)
        task = asyncio.create_task(run(), name=f"prefetch {blob.digest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for blob in self._blobs.values():
            blob.close(remove=False)
