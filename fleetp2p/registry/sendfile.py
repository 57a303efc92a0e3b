"""Zero-copy sends of file bytes into an HTTP response: the registry's cache
hits and a holder's answers to other agents both go out this way."""

from __future__ import annotations

import asyncio
import os
from typing import BinaryIO

from aiohttp import web

FALLBACK_CHUNK = 1024 * 1024


async def send_file_range(request: web.Request, response: web.StreamResponse, f: BinaryIO,
                          offset: int, count: int) -> None:
    """Bytes [offset, offset+count) of `f` into the prepared `response`. The
    kernel copies them from the page cache to the socket (`sendfile`); where it
    cannot (uvloop, TLS) they are read in a thread and written. A file shorter
    than that raises OSError (not a ConnectionError: the reader is still there,
    and must not take a short body for a whole one); `sendfile` itself stops
    quietly at the end of a file."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    try:
        sent = await asyncio.get_running_loop().sendfile(transport, f, offset, count,
                                                         fallback=False)
    except (NotImplementedError, RuntimeError):  # e.g. uvloop or TLS
        sent = await _copy(response, f, offset, count)
    if sent < count:
        raise OSError(f"{getattr(f, 'name', 'file')}: {count - sent} of {count} bytes "
                      f"from {offset} missing")


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
