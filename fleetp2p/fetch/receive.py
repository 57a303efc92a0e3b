"""Moving a byte stream onto disk without blocking the event loop.

Writing and hashing happen in a worker thread, one batch at a time, while the
next batch arrives from the network; the loop only moves buffers around.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

# Bytes buffered while the previous batch is being written and hashed.
MAX_BUFFER = 4 * 1024 * 1024

Write = Callable[[bytes, int], None]  # (data, blob offset), runs in a worker thread


async def receive(chunks: AsyncIterator[bytes], write: Write, start: int,
                  progress: Callable[[int], None]) -> int:
    """Feed `chunks` to `write` in order from blob offset `start`; call
    `progress(end)` on the loop once bytes [start, end) are written. Returns the end."""
    loop = asyncio.get_running_loop()
    pending: asyncio.Future | None = None
    pending_end = start
    offset = start
    buffered: list[bytes] = []  # joined in the worker: no copying on the loop
    size = 0

    def flush(parts: list[bytes], at: int) -> None:
        write(parts[0] if len(parts) == 1 else b"".join(parts), at)

    try:
        async for chunk in chunks:
            buffered.append(chunk)
            size += len(chunk)
            if pending is not None and (pending.done() or size >= MAX_BUFFER):
                await pending
                progress(pending_end)
                pending = None
            if pending is None:
                pending = loop.run_in_executor(None, flush, buffered, offset)
                offset += size
                pending_end = offset
                buffered, size = [], 0
        if pending is not None:
            await pending
            progress(pending_end)
            pending = None
        if buffered:
            await loop.run_in_executor(None, flush, buffered, offset)
            offset += size
            progress(offset)
    except BaseException:
        if pending is not None and not pending.done():
            await asyncio.wait([pending])  # never close the file under a running write
        raise
    return offset
