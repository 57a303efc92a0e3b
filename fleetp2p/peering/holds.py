"""A count of who holds something back, and an event for "nobody does".

Bulk transfers yield to urgent ones in two places: a holder's peer HTTP
server holds bulk reads back while it answers a read a client is blocked on,
and a node holds its own stripe reads back while it fetches a leased segment
or the piece a client waits for. Both nest (several urgent reads at once), so
the gate is a counter, not a flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

from tracker.waits import wait_event


class Holds:
    def __init__(self) -> None:
        self._count = 0
        self._free = asyncio.Event()
        self._free.set()
        self._freed_at = 0.0  # monotonic

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self._count += 1
        self._free.clear()
        try:
            yield
        finally:
            self._count -= 1
            if not self._count:
                self._free.set()
                self._freed_at = time.monotonic()

    async def wait_free(self, timeout: float | None = None, quiet: float = 0.0) -> None:
        """Return when nobody holds, and nobody has for `quiet` seconds (or after
        `timeout` seconds anyway)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            if not await wait_event(self._free, left):
                return
            wait = self._freed_at + quiet - time.monotonic()
            if wait <= 0:
                return
            await asyncio.sleep(wait if left is None else min(wait, left))
