"""How a blob is cut: segments (one torrent each) of pieces (one hash each).

On disk every blob is a directory of segment files, so libtorrent can seed a
segment straight from where the store keeps it: a torrent's file always
starts at offset 0 of its own file, so segments cannot live inside one big
blob file without copying.
"""

from __future__ import annotations

from dataclasses import dataclass

from tracker.models import choose_geometry

TARGET_SEGMENTS = 16
MIN_ADAPTIVE_SEGMENT = 4 * 1024 * 1024


@dataclass(frozen=True)
class Geometry:
    size: int
    segment_size: int
    piece_size: int

    @classmethod
    def for_size(cls, size: int, segment_size: int | None = None,
                 piece_size: int | None = None, adaptive: bool = False) -> "Geometry":
        """The tracker's rule (at most 256 segments), so a blob fetched while the
        tracker was down can still be seeded once it is back.

        `adaptive`: a blob of only a few segments pipelines badly in a cold herd
        (nobody can swarm a segment before its lease holder finished it), so
        smaller blobs get smaller segments, down to MIN_ADAPTIVE_SEGMENT, aiming
        at TARGET_SEGMENTS segments."""
        if adaptive and segment_size is not None:
            while segment_size > MIN_ADAPTIVE_SEGMENT and size < TARGET_SEGMENTS * segment_size:
                segment_size //= 2
            if piece_size is not None:
                piece_size = min(piece_size, segment_size)
        segment, piece = choose_geometry(size, segment_size, piece_size)
        return cls(size, segment, piece)

    @property
    def segments(self) -> int:
        return max(1, -(-self.size // self.segment_size))

    def segment_span(self, index: int) -> tuple[int, int]:
        """[start, end) of a segment within the blob."""
        start = index * self.segment_size
        return start, min(start + self.segment_size, self.size)

    def segment_length(self, index: int) -> int:
        start, end = self.segment_span(index)
        return end - start

    def pieces_in(self, index: int) -> int:
        return max(1, -(-self.segment_length(index) // self.piece_size))

    def locate(self, offset: int) -> tuple[int, int]:
        """(segment index, offset within it) of a blob offset."""
        return offset // self.segment_size, offset % self.segment_size
