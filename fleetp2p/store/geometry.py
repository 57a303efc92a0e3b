"""How a blob is cut: segments (one torrent each) of pieces (one hash each).

On disk every blob is a directory of segment files, so libtorrent can seed a
segment straight from where the store keeps it: a torrent's file always
starts at offset 0 of its own file, so segments cannot live inside one big
blob file without copying.
"""

from __future__ import annotations

from dataclasses import dataclass

from tracker.models import choose_geometry


@dataclass(frozen=True)
class Geometry:
    size: int
    segment_size: int
    piece_size: int

    @classmethod
    def for_size(cls, size: int, segment_size: int | None = None,
                 piece_size: int | None = None) -> "Geometry":
        """The same rule as the tracker's, so a blob fetched while the tracker
        was down can still be seeded once it is back."""
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
