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
    cannot (uvloop, TLS) they are read in a thread and written."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    try:
        await asyncio.get_running_loop().sendfile(transport, f, offset, count, fallback=False)
        return
    except (NotImplementedError, RuntimeError):
        pass  # e.g. uvloop or TLS: copy through the writer instead
    end = offset + count
    while offset < end:
        n = min(FALLBACK_CHUNK, end - offset)
        data = await asyncio.to_thread(os.pread, f.fileno(), n, offset)
        if not data:
            raise ConnectionAbortedError("file shorter than expected")
        await response.write(data)
        offset += len(data)
