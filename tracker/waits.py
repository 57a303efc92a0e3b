"""Waiting for an asyncio.Event with a timeout, without losing a cancellation.

On Python 3.11, `asyncio.wait_for(event.wait(), t)` swallows a cancel that
arrives in the same loop iteration as the event is set (CPython gh-86296):
the waiter returns as if woken and the cancel is gone. A loop around it
then never ends; an agent shut down while a fetch was waking its announcer
hung that way. `asyncio.timeout` does not have the race.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """True if the event is set within `timeout` seconds (None: no limit)."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
        return True
    except TimeoutError:
        return False
