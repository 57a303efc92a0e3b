"""Zero-copy sends of file bytes into an HTTP response: the registry's cache
hits and a holder's answers to other agents both go out this way."""

from __future__ import annotations

import asyncio
import os
from typing import BinaryIO

from aiohttp import web

FALLBACK_CHUNK = 1024 * 1024


# Cold bytes are read into the page cache in a worker thread this much at a
# time, the next part while the current one is sent.
WARM_CHUNK = 4 * 1024 * 1024
_NOWAIT = getattr(os, "RWF_NOWAIT", None)  # Linux


async def send_file_range(request: web.Request, response: web.StreamResponse, f: BinaryIO,
                          offset: int, count: int, *, warm: bool = True) -> None:
    """Bytes [offset, offset+count) of `f` into the prepared `response`. The
    kernel copies them from the page cache to the socket (`sendfile`); where it
    cannot (uvloop, TLS) they are read in a thread and written. A file shorter
    than that raises OSError (not a ConnectionError: the reader is still there,
    and must not take a short body for a whole one); `sendfile` itself stops
    quietly at the end of a file.

    `sendfile` runs on the event loop and reads what is not in the page cache
    from disk there, stalling every other transfer of the agent for each disk
    read: a blob read long ago, or one whose page cache the agent gave back
    (store/pagecache.py). So parts not in the page cache are read into it in a
    worker thread first, the next part while the current one is sent, unless
    `warm` is false (see peerhttp.py: there the thread hop costs more)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    loop = asyncio.get_running_loop()
    fd = f.fileno()
    step = WARM_CHUNK if warm else max(count, 1)  # unwarmed: one sendfile call
    parts = [(at, min(step, offset + count - at)) for at in range(offset, offset + count, step)]

    def warming_part(i: int) -> "asyncio.Future | None":
        return _warm(fd, *parts[i]) if warm and i < len(parts) else None

    warming = warming_part(0)
    sent = 0
    try:
        for i, (at, n) in enumerate(parts):
            if warming is not None:
                await warming
            warming = warming_part(i + 1)
            try:
                done = await loop.sendfile(transport, f, at, n, fallback=False)
            except (NotImplementedError, RuntimeError):  # e.g. uvloop or TLS
                done = await _copy(response, f, at, offset + count - at)
                sent += done
                break
            sent += done
            if done < n:
                break
    finally:
        if warming is not None:
            warming.cancel()
    if sent < count:
        raise OSError(f"{getattr(f, 'name', 'file')}: {count - sent} of {count} bytes "
                      f"from {offset} missing")


def _warm(fd: int, offset: int, count: int) -> "asyncio.Future | None":
    """A worker thread reading the part into the page cache, or None if it is
    there already."""
    if in_page_cache(fd, offset, count):
        return None
    future = asyncio.ensure_future(asyncio.to_thread(read_into_page_cache, fd, offset, count))
    # a part never awaited (the send ended first) must not log its failure as lost
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


def in_page_cache(fd: int, offset: int, count: int) -> bool:
    """Whether the first and last bytes of the range are in the page cache: a
    read with RWF_NOWAIT answers at once and fails where it would wait for the
    disk. True where the system or file system cannot tell (nothing changes
    there). Between the two ends, kernel readahead mostly fills the gaps."""
    if _NOWAIT is None or count <= 0:
        return True
    probe = bytearray(1)
    for at in (offset, offset + count - 1):
        try:
            os.preadv(fd, [probe], at, _NOWAIT)
        except BlockingIOError:
            return False
        except OSError:  # EOPNOTSUPP: this file system cannot say
            return True
    return True


def read_into_page_cache(fd: int, offset: int, count: int) -> None:
    """Blocking: read the range once (into a scratch buffer, reused)."""
    buffer = bytearray(min(count, FALLBACK_CHUNK))
    end = offset + count
    while offset < end:
        got = os.preadv(fd, [memoryview(buffer)[:end - offset]], offset)
        if got <= 0:
            return  # the end of the file: sendfile will say what is missing
        offset += got


async def _copy(response: web.StreamResponse, f: BinaryIO, offset: int, count: int) -> int:
    """Through the response's writer, a chunk at a time; how many bytes were there."""
    position, end = offset, offset + count
    while position < end:
        data = await asyncio.to_thread(os.pread, f.fileno(), min(FALLBACK_CHUNK, end - position),
                                       position)
        if not data:
            break
        await response.write(data)
        position += len(data)
    return position - offset
