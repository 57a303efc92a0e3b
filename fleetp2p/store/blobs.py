"""The blob store: what the node holds, complete and verified.

Layout: `blobs/<alg>/<hex>/` holds the blob's segment files `0`, `1`, … (see
geometry.py for why segments are files) and, once the whole blob has been
verified and fsynced, a `complete` marker written by atomic rename.

Invariants:
- a blob counts (is indexed, served, seeded) only with its `complete`
  marker, which is renamed into place after digest verification and fsync,
  so after any crash everything marked complete is whole;
- directories without a marker are interrupted downloads: kept for the next
  fetch of the same blob if the download left its `partial` record there
  (partials.py), deleted at startup otherwise; `tmp/` holds nothing across
  restarts either;
- LRU order is kept in memory and mirrored in file mtimes (touched at most
  once a minute per blob) so it survives restarts without a database;
- pinned blobs (seeded releases) are never evicted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fleetp2p.errors import VerificationError
from fleetp2p.metrics import Metrics
from fleetp2p.oci.reference import Digest
from fleetp2p.store.files import atomic_write
from fleetp2p.store.geometry import Geometry
from fleetp2p.store.partials import RECORD, Partials, Record, write_record
from fleetp2p.store.segments import SegmentReader, SegmentWriter

log = logging.getLogger(__name__)

TOUCH_INTERVAL = 60.0
MARKER = "complete"


@dataclass
class StoredBlob:
    digest: Digest
    path: Path  # the blob's directory
    geometry: Geometry
    last_access: float
    media_type: str | None = None

    @property
    def size(self) -> int:
        return self.geometry.size

    def reader(self) -> SegmentReader:
        return SegmentReader(self.path, self.geometry)


class BlobStore:
    def __init__(self, root: str | Path, limit: int, high: float = 0.95, low: float = 0.85,
                 metrics: Metrics | None = None) -> None:
        self.root = Path(root)
        self.limit = limit
        self.high = high
        self.low = low
        self.metrics = metrics or Metrics()
        self.blob_dir = self.root / "blobs"
        self.meta_dir = self.root / "meta"
        self.tmp_dir = self.root / "tmp"
        self._pins_path = self.root / "pins.json"
        self._index: dict[Digest, StoredBlob] = {}
        self._pins: dict[str, set[str]] = {}  # label → digests
        self._pins_lock = threading.Lock()  # gc reads pins from a worker thread
        self._total = 0
        self.partials = Partials()
        # called (blocking, in the GC thread) before a blob's files go: the swarm stops seeding it
        self.on_remove: list = []

    # Startup -------------------------------------------------------------

    def open(self) -> None:
        """Create the layout, drop leftovers of interrupted writes, index what is whole."""
        for d in (self.blob_dir, self.meta_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in self.tmp_dir.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.info("removed %d partial downloads left by a previous run", removed)
        partial = 0
        for algo_dir in self.blob_dir.iterdir():
            for path in algo_dir.iterdir():
                entry = self._read_marker(algo_dir.name, path)
                if entry is not None:
                    self._index[entry.digest] = entry
                    self._total += entry.size
                elif not self._adopt_partial(algo_dir.name, path):
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
                    partial += 1
        if partial:
            log.info("removed %d interrupted downloads left by a previous run", partial)
        if self.partials:
            log.info("kept %d interrupted downloads (%d bytes) to resume", len(self.partials),
                     self.partials.bytes)
        self._load_pins()
        self._update_gauges()
        log.info("store %s: %d blobs, %d bytes, limit %d", self.root, len(self._index),
                 self._total, self.limit)

    def _adopt_partial(self, algorithm: str, path: Path) -> bool:
        try:
            digest = Digest.parse(f"{algorithm}:{path.name}")
        except ValueError:
            return False
        return path.is_dir() and self.partials.adopt(digest, path)

    def _read_marker(self, algorithm: str, path: Path) -> StoredBlob | None:
        try:
            digest = Digest.parse(f"{algorithm}:{path.name}")
            marker = path / MARKER
            raw = json.loads(marker.read_bytes())
            geometry = Geometry(int(raw["size"]), int(raw["segment_size"]), int(raw["piece_size"]))
            return StoredBlob(digest, path, geometry, marker.stat().st_mtime)
        except (OSError, ValueError, KeyError, TypeError, Exception):
            return None

    # Lookup --------------------------------------------------------------

    def path_for(self, digest: Digest) -> Path:
        return self.blob_dir / digest.algorithm / digest.hex

    def get(self, digest: Digest) -> StoredBlob | None:
        """The complete blob, marking it recently used."""
        entry = self._index.get(digest)
        if entry is None:
            return None
        now = time.time()
        if now - entry.last_access > TOUCH_INTERVAL:
            try:
                os.utime(entry.path / MARKER, (now, now))
            except FileNotFoundError:  # removed behind our back
                self._forget(digest)
                return None
        entry.last_access = now
        return entry

    def __contains__(self, digest: Digest) -> bool:
        return digest in self._index

    def media_type(self, digest: Digest) -> str | None:
        entry = self._index.get(digest)
        if entry is None:
            return None
        if entry.media_type is None:
            try:
                entry.media_type = json.loads(self._meta_path(digest).read_bytes())["media_type"]
            except (OSError, ValueError, KeyError):
                return None
        return entry.media_type

    @property
    def total_bytes(self) -> int:
        return self._total

    def entries(self) -> list[StoredBlob]:
        return list(self._index.values())

    # Writing -------------------------------------------------------------

    def new_partial(self, digest: Digest, geometry: Geometry,
                    resume: Record | None = None) -> SegmentWriter:
        """Where a download writes. Its directory is the blob's final place (libtorrent
        seeds from stable paths); it counts only once `commit` marks it complete.
        `resume`: keep the files of an interrupted download with this record (the
        caller checks them), or start afresh with it, so a later run can resume.
        Blocking."""
        directory = self.path_for(digest)
        kept = self.partials.take(digest)
        if kept is not None:
            self._update_gauges()
        if resume is not None and kept is not None and resume.can_resume(kept.record):
            log.info("resuming %s from %d bytes on disk", digest, kept.size_on_disk)
            if kept.record != resume:
                write_record(directory, resume)
            return SegmentWriter(directory, geometry)
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
        writer = SegmentWriter(directory, geometry)
        if resume is not None:
            write_record(directory, resume)
        if geometry.size == 0:
            writer.ensure_empty_blob()
        return writer

    def keep_partial(self, writer: SegmentWriter, digest: Digest) -> None:
        """An interrupted download: resumable if it was started with `resume`,
        else deleted. Blocking."""
        writer.close()
        if self.partials.adopt(digest, writer.directory):
            self._update_gauges()
        else:
            writer.discard()

    def commit(self, writer: SegmentWriter, digest: Digest,
               media_type: str | None = None) -> StoredBlob:
        """Mark a fully written, already verified blob complete. Blocking (fsync):
        call from a worker thread."""
        writer.fsync()
        writer.close()
        if media_type is not None:
            atomic_write(self._meta_path(digest), json.dumps({"media_type": media_type}).encode())
        geometry = writer.geometry
        atomic_write(writer.directory / MARKER, json.dumps({
            "size": geometry.size, "segment_size": geometry.segment_size,
            "piece_size": geometry.piece_size, "digest": str(digest)}).encode())
        (writer.directory / RECORD).unlink(missing_ok=True)
        return self._register(digest, writer.directory, geometry, media_type)

    def put_bytes(self, digest: Digest, data: bytes, media_type: str | None = None) -> StoredBlob:
        """Store small content (manifests) after checking its digest. Blocking."""
        if hashlib.new(digest.algorithm, data).hexdigest() != digest.hex:
            self.metrics.verification_failures.labels("manifest").inc()
            raise VerificationError(f"content does not match {digest}")
        existing = self._index.get(digest)
        if existing is not None and (media_type is None or self.media_type(digest) == media_type):
            return existing
        writer = self.new_partial(digest, Geometry.for_size(len(data)))
        try:
            writer.pwrite(data, 0)
            return self.commit(writer, digest, media_type)
        except BaseException:
            writer.discard()
            raise

    def read_bytes(self, digest: Digest) -> bytes | None:
        """Small content (manifests). Blocking."""
        entry = self.get(digest)
        if entry is None:
            return None
        reader = entry.reader()
        try:
            return reader.read(0, entry.size)
        except FileNotFoundError:
            self._forget(digest)
            return None
        finally:
            reader.close()

    def _register(self, digest: Digest, path: Path, geometry: Geometry,
                  media_type: str | None) -> StoredBlob:
        previous = self._index.get(digest)
        if previous is not None:
            self._total -= previous.size
        entry = StoredBlob(digest, path, geometry, time.time(), media_type)
        self._index[digest] = entry
        self._total += geometry.size
        self._update_gauges()
        return entry

    def remove(self, digest: Digest) -> None:
        """Blocking. Marker first: an interrupted removal leaves a partial, never a
        'complete' blob with segments missing."""
        entry = self._index.get(digest)
        if entry is None:
            return
        for hook in self.on_remove:
            hook(digest)
        (entry.path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(entry.path, ignore_errors=True)
        self._meta_path(digest).unlink(missing_ok=True)
        self._forget(digest)

    def _forget(self, digest: Digest) -> None:
        entry = self._index.pop(digest, None)
        if entry is not None:
            self._total -= entry.size
            self._update_gauges()

    def _meta_path(self, digest: Digest) -> Path:
        return self.meta_dir / digest.algorithm / digest.hex

    # Pins ----------------------------------------------------------------

    def pin(self, label: str, digests: list[Digest]) -> None:
        with self._pins_lock:
            self._pins.setdefault(label, set()).update(str(d) for d in digests)
        self._save_pins()

    def unpin(self, label: str) -> bool:
        with self._pins_lock:
            found = self._pins.pop(label, None) is not None
        self._save_pins()
        return found

    def pins(self) -> dict[str, set[str]]:
        with self._pins_lock:
            return {label: set(digests) for label, digests in self._pins.items()}

    def pinned_digests(self) -> set[str]:
        with self._pins_lock:
            return set().union(*self._pins.values()) if self._pins else set()

    def is_pinned(self, digest: Digest) -> bool:
        return str(digest) in self.pinned_digests()

    def _load_pins(self) -> None:
        try:
            raw = json.loads(self._pins_path.read_bytes())
            self._pins = {label: set(digests) for label, digests in raw.items()}
        except FileNotFoundError:
            self._pins = {}
        except (ValueError, AttributeError):
            log.error("pins file %s is corrupt; starting with no pins", self._pins_path)
            self._pins = {}

    def _save_pins(self) -> None:
        data = {label: sorted(digests) for label, digests in self.pins().items()}
        atomic_write(self._pins_path, json.dumps(data, indent=1).encode())
        self._update_gauges()

    # Eviction ------------------------------------------------------------

    def needs_gc(self, incoming: int = 0) -> bool:
        return self._total + self.partials.bytes + incoming > self.limit * self.high

    def gc(self, incoming: int = 0, busy: set[Digest] | frozenset = frozenset()) -> int:
        """Evict interrupted downloads, then least recently used, unpinned blobs,
        none of them `busy`, until usage is at the low watermark. Blocking
        (unlink): call from a worker thread."""
        if not self.needs_gc(incoming):
            return 0
        target = self.limit * self.low - incoming
        freed = 0
        while self._total + self.partials.bytes > target:
            evicted = self.partials.evict_oldest(busy)
            if evicted is None:
                break
            freed += evicted.size_on_disk
            self.metrics.evicted_bytes.inc(evicted.size_on_disk)
            self._update_gauges()
        pinned = self.pinned_digests()
        for entry in sorted(self._index.values(), key=lambda e: e.last_access):
            if self._total + self.partials.bytes <= target:
                break
            if str(entry.digest) in pinned or entry.digest in busy:
                continue
            self.remove(entry.digest)
            freed += entry.size
            self.metrics.evictions.inc()
            self.metrics.evicted_bytes.inc(entry.size)
        if freed:
            log.info("gc evicted %d bytes; store now %d of %d", freed, self._total, self.limit)
        if self._total > self.limit * self.high:
            log.warning("store above high watermark after gc: pinned or busy blobs fill it")
        return freed

    def _update_gauges(self) -> None:
        self.metrics.store_bytes.set(self._total)
        self.metrics.store_blobs.set(len(self._index))
        self.metrics.store_limit.set(self.limit)
        self.metrics.store_partial_bytes.set(self.partials.bytes)
        pinned = self.pinned_digests()
        self.metrics.store_pinned_bytes.set(
            sum(e.size for d, e in self._index.items() if str(d) in pinned))
