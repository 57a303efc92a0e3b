"""A blob being downloaded, shared by every request that wants it.

Readers stream from the partial file as it grows. The last byte is held back
until the whole blob is verified: a client that sees a complete body has
a verified blob, and a blob that fails verification leaves every in-flight
response one byte short and its connection closed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fleetp2p.oci.reference import Digest
from fleetp2p.store import Geometry, SegmentReader


class DownloadFailed(Exception):
    """Raised to readers of a download that did not complete."""


class Download:
    def __init__(self, digest: Digest, directory: Path) -> None:
        self.digest = digest
        self.directory = directory
        self.geometry: Geometry | None = None
        self.size = -1
        self.written = 0
        self.verified = False
        self.error: BaseException | None = None
        self.task: asyncio.Task | None = None
        self.segment_sources: dict[int, str] = {}  # metrics label per segment; else upstream
        self.resumed = 0  # bytes an interrupted attempt had left on disk, not fetched again
        self._pieces = bytearray()
        self._next_piece = 0
        self._waiters: list[asyncio.Future] = []

    # Producer side --------------------------------------------------------

    def set_geometry(self, geometry: Geometry) -> None:
        self.geometry = geometry
        self.size = geometry.size
        self._pieces = bytearray(max(1, -(-geometry.size // geometry.piece_size)))
        self._wake()

    def advance(self, written: int) -> None:
        """Bytes [0, written) are on disk (a single in-order stream)."""
        self.written = written
        self._wake()

    def mark_pieces(self, first: int, end: int) -> None:
        """Blob-wide pieces [first, end) are on disk (segments arrive in any order)."""
        assert self.geometry is not None
        for piece in range(first, end):
            self._pieces[piece] = 1
        moved = False
        while self._next_piece < len(self._pieces) and self._pieces[self._next_piece]:
            self._next_piece += 1
            moved = True
        if moved:
            self.written = min(self._next_piece * self.geometry.piece_size, self.size)
            self._wake()

    async def wait_written(self, position: int, want: int = 1) -> int:
        """Bytes [0, n) are on disk (not yet verified): n >= position + want, or
        n > position and the whole blob is."""
        while True:
            if self.error is not None:
                raise DownloadFailed(str(self.error)) from self.error
            whole = self.written >= self.size >= 0
            if self.written >= position + max(want, 1) or (whole and self.written > position):
                return self.written
            await self._changed()

    def has_piece(self, piece: int) -> bool:
        return bool(self._pieces[piece])

    def covers(self, start: int, end: int) -> bool:
        """Every piece touching bytes [start, end) is on disk, hash-checked (from a
        peer) or hashed while streaming from upstream: safe to serve to peers."""
        if self.geometry is None or not 0 <= start < end <= self.size:
            return False
        piece = self.geometry.piece_size
        return all(self._pieces[start // piece:-(-end // piece)])

    def label_at(self, offset: int) -> str:
        if not self.segment_sources or self.geometry is None:
            return "upstream"
        return self.segment_sources.get(offset // self.geometry.segment_size, "upstream")

    def finish(self) -> None:
        self.written = self.size
        self.verified = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _changed(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    # Reader side ----------------------------------------------------------

    async def ready(self) -> int:
        """Wait until the size is known; raises the fetch error if it failed first."""
        while self.size < 0:
            if self.error is not None:
                raise self.error
            await self._changed()
        return self.size

    def readable(self) -> int:
        if self.error is not None:
            raise DownloadFailed(str(self.error)) from self.error
        if self.verified:
            return self.size
        return min(self.written, max(self.size - 1, 0))

    async def wait_readable(self, position: int, want: int = 1) -> int:
        """Bytes [0, n) may be served: n >= position + want, or n > position when
        no more will come before verification, or n == size once verified."""
        goal = min(position + max(want, 1), self.size)
        while True:
            n = self.readable()
            if self.verified:
                return n
            if n > position and (n >= goal or self.written >= self.size):
                return n
            await self._changed()

    def reader(self) -> SegmentReader:
        """The blob's segment files: the same directory before and after commit."""
        assert self.geometry is not None
        return SegmentReader(self.directory, self.geometry)
