"""wait_event: a cancel that arrives as the event is set still cancels."""

from __future__ import annotations

import asyncio

from tracker.waits import wait_event


async def _waiter(event: asyncio.Event) -> None:
    while True:  # the shape of the announcer's and the fetch's loops
        await wait_event(event, 10)
        event.clear()


async def test_a_cancel_racing_the_event_is_not_lost():
    event = asyncio.Event()
    task = asyncio.create_task(_waiter(event))
    await asyncio.sleep(0.01)
    event.set()
    task.cancel()  # asyncio.wait_for on 3.11 would swallow this one
    done, _ = await asyncio.wait([task], timeout=1.0)
    assert done and task.cancelled()


async def test_it_says_whether_the_event_came():
    event = asyncio.Event()
    assert not await wait_event(event, 0.01)
    event.set()
    assert await wait_event(event, 0.01)
    assert await wait_event(event, None)
