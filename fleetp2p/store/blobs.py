"""The blob store: what the node holds, complete and verified.

Invariants:
- a file under `blobs/` was renamed there only after its digest was verified
  and its bytes fsynced, so after any crash everything in `blobs/` is whole;
- partial downloads live under `tmp/` and are deleted at startup;
- LRU order is kept in memory and mirrored in file mtimes (touched at most
  once a minute per blob) so it survives restarts without a database;
- pinned blobs (seeded releases) are never evicted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from fleetp2p.errors import VerificationError
from fleetp2p.metrics import Metrics
from fleetp2p.oci.reference import Digest
from fleetp2p.store.files import atomic_write, fsync_dir

log = logging.getLogger(__name__)

TOUCH_INTERVAL = 60.0


@dataclass
class StoredBlob:
    digest: Digest
    path: Path
    size: int
    last_access: float
    media_type: str | None = None


class TempBlob:
    """A blob being written. Writes go through `pwrite` so readers of the
    same file (in-flight streaming) see bytes as soon as they are written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


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
        self._total = 0

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
        for algo_dir in self.blob_dir.iterdir():
            for path in algo_dir.iterdir():
                if path.name.startswith("."):
                    path.unlink(missing_ok=True)  # an atomic_write interrupted before rename
                    continue
                try:
                    digest = Digest.parse(f"{algo_dir.name}:{path.name}")
                except Exception:
                    log.warning("ignoring unexpected file in store: %s", path)
                    continue
                st = path.stat()
                self._index[digest] = StoredBlob(digest, path, st.st_size, st.st_mtime)
                self._total += st.st_size
        self._load_pins()
        self._update_gauges()
        log.info("store %s: %d blobs, %d bytes, limit %d", self.root, len(self._index),
                 self._total, self.limit)

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
                os.utime(entry.path, (now, now))
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

    def new_temp(self, digest: Digest) -> TempBlob:
        return TempBlob(self.tmp_dir / f"{digest.hex}.{secrets.token_hex(4)}.part")

    def commit(self, temp: TempBlob, digest: Digest, size: int, media_type: str | None = None) -> StoredBlob:
        """Make a fully written, already verified temp file a stored blob.
        Blocking (fsync): call from a worker thread."""
        os.fsync(temp.fd)
        temp.close()
        if media_type is not None:
            atomic_write(self._meta_path(digest), json.dumps({"media_type": media_type}).encode())
        target = self.path_for(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp.path, target)
        fsync_dir(target.parent)
        return self._register(digest, target, size, media_type)

    def put_bytes(self, digest: Digest, data: bytes, media_type: str | None = None) -> StoredBlob:
        """Store small content (manifests) after checking its digest. Blocking."""
        if hashlib.new(digest.algorithm, data).hexdigest() != digest.hex:
            self.metrics.verification_failures.labels("manifest").inc()
            raise VerificationError(f"content does not match {digest}")
        existing = self._index.get(digest)
        if existing is not None and (media_type is None or self.media_type(digest) == media_type):
            return existing
        temp = self.new_temp(digest)
        try:
            temp.pwrite(data, 0)
            return self.commit(temp, digest, len(data), media_type)
        except BaseException:
            temp.discard()
            raise

    def read_bytes(self, digest: Digest) -> bytes | None:
        """Small content (manifests). Blocking."""
        entry = self.get(digest)
        if entry is None:
            return None
        try:
            return entry.path.read_bytes()
        except FileNotFoundError:
            self._forget(digest)
            return None

    def _register(self, digest: Digest, path: Path, size: int, media_type: str | None) -> StoredBlob:
        previous = self._index.get(digest)
        if previous is not None:
            self._total -= previous.size
        entry = StoredBlob(digest, path, size, time.time(), media_type)
        self._index[digest] = entry
        self._total += size
        self._update_gauges()
        return entry

    def remove(self, digest: Digest) -> None:
        entry = self._index.get(digest)
        if entry is None:
            return
        entry.path.unlink(missing_ok=True)
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
        self._pins.setdefault(label, set()).update(str(d) for d in digests)
        self._save_pins()

    def unpin(self, label: str) -> bool:
        found = self._pins.pop(label, None) is not None
        self._save_pins()
        return found

    def pins(self) -> dict[str, set[str]]:
        return {label: set(digests) for label, digests in self._pins.items()}

    def is_pinned(self, digest: Digest) -> bool:
        text = str(digest)
        return any(text in digests for digests in self._pins.values())

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
        data = {label: sorted(digests) for label, digests in self._pins.items()}
        atomic_write(self._pins_path, json.dumps(data, indent=1).encode())
        self._update_gauges()

    # Eviction ------------------------------------------------------------

    def needs_gc(self, incoming: int = 0) -> bool:
        return self._total + incoming > self.limit * self.high

    def gc(self, incoming: int = 0, busy: set[Digest] | frozenset = frozenset()) -> int:
        """Evict least recently used, unpinned, not busy blobs until usage is
        at the low watermark. Blocking (unlink): call from a worker thread."""
        if not self.needs_gc(incoming):
            return 0
        target = self.limit * self.low - incoming
        pinned = set().union(*self._pins.values()) if self._pins else set()
        freed = 0
        for entry in sorted(self._index.values(), key=lambda e: e.last_access):
            if self._total <= target:
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
        pinned = set().union(*self._pins.values()) if self._pins else set()
        self.metrics.store_pinned_bytes.set(
            sum(e.size for d, e in self._index.items() if str(d) in pinned))
