"""send_file_range (fleetp2p/registry/sendfile.py), which the registry's cache
hits and a holder's answers both go through: a file shorter than the range is
an error on either path, never a short body."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from fleetp2p.registry.sendfile import send_file_range


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

    app = web.Application()
    app.router.add_get("/", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        # a short body that is not aborted would leave the client waiting: bounded here
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.get(f"http://127.0.0.1:{server.port}/") as resp:
                    await resp.read()
    finally:
        await server.close()
    assert len(outcome) == 1 and isinstance(outcome[0], OSError)
    assert not isinstance(outcome[0], ConnectionError)
    assert "800 of 1000 bytes from 100 missing" in str(outcome[0])
