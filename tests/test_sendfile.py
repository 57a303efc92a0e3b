"""send_file_range (fleetp2p/registry/sendfile.py), which the registry's cache
hits and a holder's answers both go through: bytes not in the page cache are
read into it off the event loop; a file shorter than the range is an error on
either path, never a short body."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from fleetp2p.registry import sendfile
from fleetp2p.registry.sendfile import in_page_cache, send_file_range
from fleetp2p.store.pagecache import release


@contextlib.asynccontextmanager
async def _serving(handler) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}/"
    finally:
        await server.close()


async def _serve_file(path: Path, offset: int, count: int) -> bytes:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = count
        await response.prepare(request)
        with open(path, "rb") as f:
            await send_file_range(request, response, f, offset, count)
        await response.write_eof()
        return response

    async with _serving(handler) as url, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url) as resp:
            return await resp.read()


async def test_bytes_not_in_the_page_cache_are_read_in_a_thread_not_on_the_loop(
        tmp_path: Path, monkeypatch):
    """sendfile would read them from disk on the event loop, stalling every
    other transfer: they are read into the page cache by a worker first."""
    path = tmp_path / "cold"
    data = os.urandom(10 * 1024 * 1024 + 123)
    path.write_bytes(data)
    release(path)  # as an agent does a while after it verified a blob
    with open(path, "rb") as f:
        assert not in_page_cache(f.fileno(), 0, len(data))
    readers: list[int] = []
    read = sendfile.read_into_page_cache

    def recording(fd: int, offset: int, count: int) -> None:
        readers.append(threading.get_ident())
        read(fd, offset, count)
    monkeypatch.setattr(sendfile, "read_into_page_cache", recording)
    assert await _serve_file(path, 100, len(data) - 100) == data[100:]
    assert readers  # (kernel readahead may bring a later part in with an earlier one)
    assert threading.get_ident() not in readers

    readers.clear()  # now every part is in the page cache: no thread hop
    with open(path, "rb") as f:
        assert in_page_cache(f.fileno(), 0, len(data))
    assert await _serve_file(path, 0, len(data)) == data
    assert readers == []


@pytest.mark.parametrize("path", ["sendfile", "copy"])
async def test_a_range_past_the_end_of_its_file_raises(tmp_path: Path, path: str, monkeypatch):
    (tmp_path / "f").write_bytes(b"x" * 300)
    outcome: list[BaseException | None] = []
    if path == "copy":  # as under uvloop, which has no loop.sendfile
        async def unsupported(*args, **kwargs):
            raise NotImplementedError
        monkeypatch.setattr(asyncio.get_running_loop(), "sendfile", unsupported, raising=False)

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 1000
        await response.prepare(request)
        try:
            with open(tmp_path / "f", "rb") as f:
                await send_file_range(request, response, f, 100, 1000)
            outcome.append(None)
        except OSError as e:
            outcome.append(e)
            request.transport.abort()
        return response

    # a short body that is not aborted would leave the client waiting: bounded here
    async with _serving(handler) as url, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.get(url) as resp:
                await resp.read()
    assert len(outcome) == 1 and isinstance(outcome[0], OSError)
    assert not isinstance(outcome[0], ConnectionError)
    assert "800 of 1000 bytes from 100 missing" in str(outcome[0])
