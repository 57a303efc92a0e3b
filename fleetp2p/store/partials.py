"""Interrupted downloads, kept for the next attempt at the same blob.

A fleet download writes into the blob's final directory (libtorrent seeds
from stable paths) and drops a `partial` record there: the digest and the
geometry its segment files are cut with. When the agent dies or restarts
half-way, the files stay. The next fetch of that digest with the same
geometry keeps them, and every segment it adds to the swarm is checked by
libtorrent against the published piece hashes first: pieces that match count
as on disk, the rest are fetched as usual, and the whole-blob digest is still
checked at the end. A restart 40 GB into a 50 GB pull then costs 10 GB.

Kept partials count against the store's limit and GC evicts them, oldest
first, before any complete blob: they are the cheapest bytes to lose.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from fleetp2p.oci.reference import Digest
from fleetp2p.store.files import atomic_write
from fleetp2p.store.geometry import Geometry

log = logging.getLogger(__name__)

RECORD = "partial"


@dataclass(frozen=True)
class Partial:
    digest: Digest
    path: Path
    geometry: Geometry
    size_on_disk: int
    mtime: float


def write_record(directory: Path, digest: Digest, geometry: Geometry) -> None:
    atomic_write(directory / RECORD, json.dumps({
        "digest": str(digest), "size": geometry.size, "segment_size": geometry.segment_size,
        "piece_size": geometry.piece_size}).encode())


def read_record(directory: Path) -> tuple[Digest, Geometry] | None:
    """The record's digest and geometry; None if it is missing or unreadable."""
    try:
        raw = json.loads((directory / RECORD).read_bytes())
        geometry = Geometry(int(raw["size"]), int(raw["segment_size"]), int(raw["piece_size"]))
        if geometry.size < 0 or geometry.segment_size <= 0 or geometry.piece_size <= 0:
            return None
        return Digest.parse(raw["digest"]), geometry
    except (OSError, ValueError, KeyError, TypeError):
        return None


def usage(directory: Path) -> tuple[int, float]:
    """Bytes in the directory's files, and when the newest was last written."""
    stats = [entry.stat() for entry in os.scandir(directory) if entry.is_file()]
    return sum(s.st_size for s in stats), max((s.st_mtime for s in stats), default=0.0)


class Partials:
    """The store's idle partials (not being fetched right now). Thread-safe:
    fetches take them from worker threads while GC evicts from another."""

    def __init__(self) -> None:
        self._idle: dict[Digest, Partial] = {}
        self._lock = threading.Lock()

    def adopt(self, digest: Digest, path: Path) -> bool:
        """At startup: keep a marker-less blob directory whose record names this
        digest; False means it is debris to delete."""
        record = read_record(path)
        if record is None or record[0] != digest:
            return False
        size, mtime = usage(path)
        with self._lock:
            self._idle[digest] = Partial(digest, path, record[1], size, mtime)
        return True

    def take(self, digest: Digest) -> Partial | None:
        """The idle partial of a blob whose fetch starts now: no longer GC's."""
        with self._lock:
            return self._idle.pop(digest, None)

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(p.size_on_disk for p in self._idle.values())

    def __len__(self) -> int:
        return len(self._idle)

    def evict_oldest(self) -> Partial | None:
        """Remove the partial written to least recently. Blocking."""
        with self._lock:
            if not self._idle:
                return None
            oldest = min(self._idle.values(), key=lambda p: p.mtime)
            del self._idle[oldest.digest]
        shutil.rmtree(oldest.path, ignore_errors=True)
        log.info("gc removed the interrupted download of %s (%d bytes)", oldest.digest,
                 oldest.size_on_disk)
        return oldest
