"""Sets of half-open byte ranges: which parts of a lazily read blob are on disk."""

from __future__ import annotations

import bisect


class IntervalSet:
    """Disjoint, sorted [start, end) ranges; adjacent ranges are merged."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect.bisect_left(self._ends, start)  # first range that ends at/after start
        j = bisect.bisect_right(self._starts, end)  # ranges starting at/before end overlap
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) not in the set."""
        gaps = []
        position = start
        i = bisect.bisect_right(self._ends, start)
        while position < end and i < len(self._starts):
            s, e = self._starts[i], self._ends[i]
            if s >= end:
                break
            if s > position:
                gaps.append((position, s))
            position = max(position, e)
            i += 1
        if position < end:
            gaps.append((position, end))
        return gaps

    def covers(self, start: int, end: int) -> bool:
        return not self.missing(start, end)

    @property
    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends))

    def __iter__(self):
        return iter(zip(self._starts, self._ends))
