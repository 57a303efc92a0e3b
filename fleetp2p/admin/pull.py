"""One `seed` or `pull` on the agent: pin, fetch every blob, report progress.

The job talks to the fetch path only through `BlobFetcher.open()` and the
`BlobSource` protocol (`size`, `wait_readable`, `label_at`), so whatever the
fetcher does — local store, peers, upstream, a download another client
started — the job reports where the bytes came from as the fetcher says,
never by guessing.

Events (each a JSON object with an `event` key) go to `emit`:
  blob_start {digest, size, source}   a blob's fetch was opened
  progress   {blobs: {digest: done}}  bytes verified-readable so far, every TICK
  blob_done  {digest, size, source, by_source}
  summary    {...}                    last event of a job that succeeded
Failures raise; the API turns them into a final `error` event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fleetp2p.admin.resolve import BlobRef, Resolved
from fleetp2p.errors import FleetError, VerificationError
from fleetp2p.fetch import BlobFetcher, BlobSource
from fleetp2p.metrics import SOURCES
from fleetp2p.oci.reference import Digest
from fleetp2p.store import BlobStore

Emit = Callable[[dict[str, Any]], None]
TICK = 0.25
CONCURRENCY = 4  # blobs fetched at once: enough to fill a link, few enough to finish layers early


class PullJob:
    def __init__(self, resolved: Resolved, blobs: BlobFetcher, store: BlobStore,
                 pin_label: str | None) -> None:
        self.resolved = resolved
        self.blobs = blobs
        self.store = store
        self.pin_label = pin_label
        self._active: dict[str, int] = {}
        self._by_source: dict[str, int] = {s: 0 for s in SOURCES}
        self._previous_pin: set[str] | None = None

    async def run(self, emit: Emit) -> dict[str, Any]:
        started = time.monotonic()
        if self.pin_label is not None:
            self._pin()
        ticker = asyncio.create_task(self._tick(emit))
        try:
            await self._fetch_all(emit)
            if self.pin_label is not None:
                self._check_manifests_present()
        except BaseException:
            self._restore_pin()
            raise
        finally:
            ticker.cancel()
        seconds = time.monotonic() - started
        return self._summary(seconds)

    # Pins ------------------------------------------------------------------

    def _pin(self) -> None:
        """Pin before fetching: a blob fetched early in a big seed must not be
        evicted by the GC that a later blob of the same seed triggers."""
        assert self.pin_label is not None
        self._previous_pin = self.store.pins().get(self.pin_label)
        self.store.pin(self.pin_label, self.resolved.digests())

    def _restore_pin(self) -> None:
        """A failed or aborted seed leaves the pins as they were before it."""
        if self.pin_label is None:
            return
        previous = self._previous_pin
        self.store.unpin(self.pin_label)
        if previous:
            self.store.pin(self.pin_label, [Digest.parse(d) for d in previous])

    # Fetching --------------------------------------------------------------

    async def _fetch_all(self, emit: Emit) -> None:
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(blob: BlobRef) -> None:
            async with limit:
                await self._fetch_one(blob, emit)

        try:
            async with asyncio.TaskGroup() as group:
                for blob in self.resolved.blobs:
                    group.create_task(one(blob))
        except BaseExceptionGroup as group_error:
            raise _first_error(group_error) from None

    async def _fetch_one(self, blob: BlobRef, emit: Emit) -> None:
        ref = self.resolved.ref
        source = await self.blobs.open(ref.registry, ref.repository, blob.digest)
        if source.size != blob.size:
            raise VerificationError(f"{blob.digest} is {source.size} bytes, the manifest says "
                                    f"{blob.size}")
        digest = str(blob.digest)
        emit({"event": "blob_start", "digest": digest, "size": blob.size,
              "source": _source_label(source)})
        self._active[digest] = 0
        try:
            await self._wait_complete(source, digest)
        except FleetError:
            raise
        except Exception as e:  # the fetcher's DownloadFailed and the like
            raise FleetError(f"fetch of {digest} failed: {e or type(e).__name__}") from e
        finally:
            self._active.pop(digest, None)
        if self.store.get(blob.digest) is None:
            raise VerificationError(f"{digest} is not in the store after its fetch completed")
        by_source = bytes_by_source(source, blob.size)
        for name, count in by_source.items():
            self._by_source[name] = self._by_source.get(name, 0) + count
        emit({"event": "blob_done", "digest": digest, "size": blob.size,
              "source": max(by_source, key=by_source.__getitem__), "by_source": by_source})

    async def _wait_complete(self, source: BlobSource, digest: str) -> None:
        """`wait_readable` releases the last byte only once the blob is verified,
        so reaching `size` means verified (and committed to the store)."""
        position = 0
        while True:
            position = await source.wait_readable(position)
            self._active[digest] = position
            if position >= source.size:
                await source.stored()
                return

    async def _tick(self, emit: Emit) -> None:
        """Progress of every active blob, also a keep-alive for the client."""
        while True:
            await asyncio.sleep(TICK)
            if self._active:
                emit({"event": "progress", "blobs": dict(self._active)})

    def _check_manifests_present(self) -> None:
        """A seed promises the whole reference stays on the node (a plain pull
        does not: in a full store its manifests may go before its last layer)."""
        missing = [str(d) for d in self.resolved.manifests if d not in self.store]
        if missing:
            raise VerificationError(f"manifests evicted during the pull: {', '.join(missing)}")

    def _summary(self, seconds: float) -> dict[str, Any]:
        r = self.resolved
        return {"event": "summary", "ref": str(r.ref), "digest": str(r.digest),
                "media_type": r.media_type, "artifact_type": r.artifact_type,
                "platforms": r.platforms, "manifests": len(r.manifests), "blobs": len(r.blobs),
                "bytes": r.total_bytes, "by_source": dict(self._by_source),
                "skipped": r.skipped, "seconds": round(seconds, 3), "pinned": self.pin_label}


def _source_label(source: BlobSource) -> str:
    """Where the fetcher says the first byte comes from (the whole blob for a
    plain upstream fetch; segments may differ once peers take part)."""
    return source_label_at(source, 0)


def source_label_at(source: object, offset: int) -> str:
    label_at = getattr(source, "label_at", None)
    if callable(label_at):
        return str(label_at(offset))
    return str(getattr(source, "label", None) or getattr(source, "source", "upstream"))


def bytes_by_source(source: object, size: int) -> dict[str, int]:
    """Bytes per source, as the fetcher attributes them: per segment when the
    blob has a segment geometry (peers fill some segments, upstream others),
    else the whole blob to the source of its first byte. `source` is a
    `BlobSource` or an in-flight `Download` (both answer `label_at`)."""
    geometry = getattr(source, "geometry", None) or \
        getattr(getattr(source, "download", None), "geometry", None)
    step = getattr(geometry, "segment_size", 0) or size or 1
    counts: dict[str, int] = {}
    for start in range(0, max(size, 1), step):
        label = source_label_at(source, start)
        counts[label] = counts.get(label, 0) + min(step, size - start)
    return counts


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """TaskGroup wraps failures; the caller wants the first real one."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return _first_error(error)
        if not isinstance(error, asyncio.CancelledError):
            return error
    return group.exceptions[0]
