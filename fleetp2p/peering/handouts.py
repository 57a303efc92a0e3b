"""Which pieces of a segment a holder has handed to the fleet's stripe readers.

While a segment's holders are few, the downloaders read its pieces from a
holder over HTTP, one piece each time, and spread them among themselves over
BitTorrent (fetch/stripes.py). The holder decides which piece a reader gets:
the lowest one it has not handed to anybody yet and the reader lacks. So
every piece leaves the holder once, and each reader gets pieces at the rate
it takes them: a fast reader is not left idle while a slow one still works
through a share fixed in advance (with shares fixed by hashing, the largest
of 15 was 1.4 x the smallest on the fleet bench, and for the last 3 s the
holder sent only to a few nodes, whose uplinks then had to fan it all out).

A round is forgotten once nobody has asked for a while: 2 s after every
piece was handed out (the downloaders of that wave stop asking at their
first "none left", so a later wave, even one that starts right after, is
served again), 30 s otherwise (a segment's readers may be busy with other
segments for seconds, and starting over would hand its pieces out twice).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

ROUND_TTL = 30.0     # seconds without a request after which a round starts over…
ROUND_QUIET = 2.0    # …or, once every piece was handed out, this many
MAX_ROUNDS = 1024    # rounds remembered at once (least recently used go first)
MAX_PIECES = 1 << 16


@dataclass(frozen=True)
class Span:
    """A segment's bytes [start, end) of a blob, cut into pieces of `piece` bytes."""

    start: int
    end: int
    piece: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end and self.piece > 0 and self.pieces <= MAX_PIECES):
            raise ValueError(f"bad span {self.start}-{self.end} / {self.piece}")

    @property
    def pieces(self) -> int:
        return -(-(self.end - self.start) // self.piece)

    def bounds(self, piece: int) -> tuple[int, int]:
        lo = self.start + piece * self.piece
        return lo, min(lo + self.piece, self.end)

    def piece_at(self, start: int, end: int) -> int | None:
        """The piece whose bounds are exactly [start, end), if any."""
        index, rest = divmod(start - self.start, self.piece)
        if rest or not 0 <= index < self.pieces or self.bounds(index) != (start, end):
            return None
        return index


def bitfield(pieces: int, has: Callable[[int], bool]) -> bytes:
    """BitTorrent's layout: piece 0 is the high bit of the first byte."""
    bits = bytearray(-(-pieces // 8))
    for p in range(pieces):
        if has(p):
            bits[p >> 3] |= 0x80 >> (p & 7)
    return bytes(bits)


def has_bit(bits: bytes, piece: int) -> bool:
    return bool(bits[piece >> 3] & (0x80 >> (piece & 7)))


class Handouts:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._rounds: OrderedDict[tuple[str, Span], tuple[bytearray, float]] = OrderedDict()

    def take(self, digest: str, span: Span, have: bytes, holds: Callable[[int, int], bool]
             ) -> int | None:
        """The lowest piece of `span` not handed out in this round, missing from
        `have` (the reader's bitfield) and held here (`holds(start, end)`);
        None when there is none."""
        if len(have) != -(-span.pieces // 8):
            raise ValueError(f"bitfield of {len(have)} bytes for {span.pieces} pieces")
        handed = self._round(digest, span)
        for p in range(span.pieces):
            if handed[p] or has_bit(have, p) or not holds(*span.bounds(p)):
                continue
            handed[p] = 1
            return p
        return None

    def give_back(self, digest: str, span: Span, piece: int) -> None:
        """A handout that never reached its reader: the next reader gets it."""
        entry = self._rounds.get((digest, span))
        if entry is not None:
            entry[0][piece] = 0

    def _round(self, digest: str, span: Span) -> bytearray:
        key = (digest, span)
        now = self._clock()
        entry = self._rounds.pop(key, None)
        if entry is not None and now - entry[1] < (ROUND_QUIET if 0 not in entry[0] else ROUND_TTL):
            handed = entry[0]
        else:
            handed = bytearray(span.pieces)
        self._rounds[key] = (handed, now)
        while len(self._rounds) > MAX_ROUNDS:
            self._rounds.popitem(last=False)
        return handed
