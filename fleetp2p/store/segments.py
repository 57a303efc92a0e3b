"""Reading and writing a blob kept as a directory of segment files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO, Iterator

from fleetp2p.store.geometry import Geometry


def segment_path(directory: Path, index: int) -> Path:
    return directory / str(index)


class SegmentWriter:
    """Positional writes into the segment files of a blob being downloaded.
    Blocking: call from worker threads."""

    def __init__(self, directory: Path, geometry: Geometry) -> None:
        self.directory = directory
        self.geometry = geometry
        self._fds: dict[int, int] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def _fd(self, index: int) -> int:
        fd = self._fds.get(index)
        if fd is None:
            fd = os.open(segment_path(self.directory, index), os.O_RDWR | os.O_CREAT, 0o644)
            self._fds[index] = fd
        return fd

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            index, within = self.geometry.locate(offset)
            room = self.geometry.segment_length(index) - within
            part = view[:room]
            fd = self._fd(index)
            while part:
                written = os.pwrite(fd, part, within)
                part = part[written:]
                within += written
            offset += min(room, len(view))
            view = view[room:]

    def stream_prefix(self) -> int:
        """n such that bytes [0, n) are in the files, for a writer that wrote in
        order: every segment file is full up to the first that is not. Blocking."""
        done = 0
        for index in range(self.geometry.segments):
            try:
                size = os.stat(segment_path(self.directory, index)).st_size
            except FileNotFoundError:
                break
            length = self.geometry.segment_length(index)
            done += min(size, length)
            if size < length:
                break
        return done

    def ensure_empty_blob(self) -> None:
        """A zero-byte blob still has its one (empty) segment file."""
        self._fd(0)

    def fsync(self) -> None:
        """Every segment, including those libtorrent wrote through its own handles."""
        for index in range(self.geometry.segments):
            fd = self._fds.get(index)
            if fd is not None:
                os.fsync(fd)
                continue
            fd = os.open(segment_path(self.directory, index), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class SegmentReader:
    """Maps blob offsets to (open segment file, offset) for sendfile.
    Opening is lazy; a reader of a blob still downloading opens a segment
    only once bytes in it are readable."""

    def __init__(self, directory: Path, geometry: Geometry) -> None:
        self.directory = directory
        self.geometry = geometry
        self._files: dict[int, BinaryIO] = {}

    def file(self, index: int) -> BinaryIO:
        """Blocking (open): cheap, but call from a thread when on the event loop."""
        f = self._files.get(index)
        if f is None:
            f = open(segment_path(self.directory, index), "rb")
            self._files[index] = f
        return f

    def opened(self, index: int) -> BinaryIO | None:
        """The segment's file if already open (no blocking call needed)."""
        return self._files.get(index)

    def read_into(self, offset: int, buffer: bytearray | memoryview) -> int:
        """Fill `buffer` from `offset` (reusing one buffer keeps the heap small). Blocking."""
        view = memoryview(buffer)
        filled = 0
        for index, within, n in self.pieces(offset, len(view)):
            got = os.preadv(self.file(index).fileno(), [view[filled:filled + n]], within)
            filled += got
            if got < n:
                break
        return filled

    def pieces(self, offset: int, count: int) -> Iterator[tuple[int, int, int]]:
        """(segment index, offset in segment, length) covering [offset, offset+count)."""
        end = offset + count
        while offset < end:
            index, within = self.geometry.locate(offset)
            n = min(end - offset, self.geometry.segment_length(index) - within)
            yield index, within, n
            offset += n

    def read(self, offset: int, count: int) -> bytes:
        """Blocking."""
        out = bytearray()
        for index, within, n in self.pieces(offset, count):
            out += os.pread(self.file(index).fileno(), n, within)
        return bytes(out)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
