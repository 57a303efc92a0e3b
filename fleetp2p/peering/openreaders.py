"""Segment readers a holder keeps open between its answers to other agents.

A stripe takes a segment's pieces one request at a time, dozens a second
per holder. Opening the segment's file for each (in a worker thread, like
every file open on the event loop) cost more than sending the piece: on the
cold fleet bench the thread hop took 34 ms median, a third of a response's
time in its slot. Readers are kept per source (the store entry, download or
lazy blob that answered the lookup), so a blob that is fetched again after a
failed verification never reads through its predecessor's files.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fleetp2p.store import SegmentReader

IDLE = 10.0     # seconds unused after which a reader's files are closed
MAX_OPEN = 32   # readers kept at most (beyond those in use)


@dataclass
class _Entry:
    source: object  # held, so that its id() is not reused while the entry lives
    reader: SegmentReader
    users: int = 0
    used: float = 0.0


class OpenReaders:
    def __init__(self, idle: float = IDLE, clock: Callable[[], float] = time.monotonic) -> None:
        self._idle = idle
        self._clock = clock
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._sweep: asyncio.TimerHandle | None = None

    @contextlib.contextmanager
    def reader(self, opener: Callable[[], SegmentReader]) -> Iterator[SegmentReader]:
        """The reader `opener` makes (a bound method of the bytes' source), shared
        with other answers from the same source while it is in use or recent."""
        self._close_stale()
        source = getattr(opener, "__self__", opener)
        entry = self._entries.pop(id(source), None)
        if entry is None:
            entry = _Entry(source, opener())
        self._entries[id(source)] = entry  # most recently used last
        entry.users += 1
        try:
            yield entry.reader
        finally:
            entry.users -= 1
            entry.used = self._clock()
            self._sweep_later()

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for entry in self._entries.values():
            entry.reader.close()
        self._entries.clear()

    def _sweep_later(self) -> None:
        """Idle readers are closed even if no answer follows: an open file of a
        blob that GC removed keeps its disk space in use."""
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self._idle, self._swept)

    def _swept(self) -> None:
        self._sweep = None
        self._close_stale()
        if self._entries:
            self._sweep_later()

    def _close_stale(self) -> None:
        now = self._clock()
        for key, entry in list(self._entries.items()):
            if entry.users == 0 and (len(self._entries) > MAX_OPEN or now - entry.used > self._idle):
                del self._entries[key]
                entry.reader.close()
