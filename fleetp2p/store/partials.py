"""Interrupted downloads, kept for the next attempt at the same blob.

A download writes into the blob's final directory (libtorrent seeds from
stable paths) and drops a `partial` record there: the digest, the geometry
its segment files are cut with, and whether it writes one in-order stream.
When the agent dies or restarts half-way, the files stay, and the next fetch
of that digest keeps them:
- a fleet fetch has libtorrent check every segment file it adds to the swarm
  against the published piece hashes: pieces that match count as on disk;
- a single upstream stream hashes the bytes already on disk again and asks
  upstream for the rest with `Range`.
The whole-blob digest is still checked at the end, before the last byte goes
out. A restart 40 GB into a 50 GB pull then costs 10 GB.

Kept partials count against the store's limit and GC evicts them, oldest
first, before any complete blob: they are the cheapest bytes to lose.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

from fleetp2p.oci.reference import Digest
from fleetp2p.store.files import atomic_write
from fleetp2p.store.geometry import Geometry

log = logging.getLogger(__name__)

RECORD = "partial"


@dataclass(frozen=True)
class Record:
    digest: Digest
    geometry: Geometry
    # written as one in-order stream (a resume continues after the bytes on
    # disk), rather than piece by piece (a resume checks every piece)
    stream: bool = False

    def can_resume(self, earlier: "Record") -> bool:
        """Files an earlier attempt left are usable for this one: cut the same
        way, and in-order if this one continues a stream (a piece-by-piece
        download leaves holes; a check of every piece copes with anything)."""
        return (self.digest == earlier.digest and self.geometry == earlier.geometry
                and (earlier.stream or not self.stream))


@dataclass(frozen=True)
class Partial:
    record: Record
    path: Path
    size_on_disk: int
    mtime: float


def write_record(directory: Path, record: Record) -> None:
    atomic_write(directory / RECORD, json.dumps({
        "digest": str(record.digest), "size": record.geometry.size,
        "segment_size": record.geometry.segment_size, "piece_size": record.geometry.piece_size,
        "stream": record.stream}).encode())


def read_record(directory: Path) -> Record | None:
    """None if the record is missing or unreadable."""
    try:
        raw = json.loads((directory / RECORD).read_bytes())
        geometry = Geometry(int(raw["size"]), int(raw["segment_size"]), int(raw["piece_size"]))
        if geometry.size < 0 or geometry.segment_size <= 0 or geometry.piece_size <= 0:
            return None
        return Record(Digest.parse(raw["digest"]), geometry, raw.get("stream") is True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def usage(directory: Path) -> tuple[int, float]:
    """Bytes the directory's files take on disk (allocated: a piece-by-piece
    download leaves holes), and when the newest was last written."""
    stats = [entry.stat() for entry in os.scandir(directory) if entry.is_file()]
    return sum(s.st_blocks * 512 for s in stats), max((s.st_mtime for s in stats), default=0.0)


class Partials:
    """The store's idle partials (not being fetched right now). Thread-safe:
    fetches take them from worker threads while GC evicts from another."""

    def __init__(self) -> None:
        self._idle: dict[Digest, Partial] = {}
        self._lock = threading.Lock()

    def adopt(self, digest: Digest, path: Path) -> bool:
        """Keep a marker-less blob directory (found at startup, or left by a fetch
        that stopped) whose record names this digest; False: it is debris."""
        record = read_record(path)
        if record is None or record.digest != digest:
            return False
        size, mtime = usage(path)
        with self._lock:
            self._idle[digest] = Partial(record, path, size, mtime)
        return True

    def peek(self, digest: Digest) -> Partial | None:
        with self._lock:
            return self._idle.get(digest)

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

    def evict_oldest(self, busy: AbstractSet[Digest] = frozenset()) -> Partial | None:
        """Remove the partial written to least recently, unless a fetch is about
        to resume it (`busy`). Blocking."""
        with self._lock:
            candidates = [p for p in self._idle.values() if p.record.digest not in busy]
            if not candidates:
                return None
            oldest = min(candidates, key=lambda p: p.mtime)
            del self._idle[oldest.record.digest]
        shutil.rmtree(oldest.path, ignore_errors=True)
        log.info("gc removed the interrupted download of %s (%d bytes)", oldest.record.digest,
                 oldest.size_on_disk)
        return oldest
