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
from collections.abc import Iterator


class Holds:
    def __init__(self) -> None:
        self._count = 0
        self._free = asyncio.Event()
        self._free.set()

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

    async def wait_free(self, timeout: float | None = None) -> None:
        """Return when nobody holds (or after `timeout` seconds anyway)."""
        try:
            await asyncio.wait_for(self._free.wait(), timeout)
        except asyncio.TimeoutError:
            pass
