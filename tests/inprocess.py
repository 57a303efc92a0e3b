"""In-process agent and a scriptable fake upstream, for fault tests that a
real registry cannot be made to perform (500s, 429s, cut or stalled bodies,
ignored Range, corrupt bytes). Real-registry tests live in test_clients.py."""

from __future__ import annotations

import asyncio
import hashlib
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from aiohttp import web
from aiohttp.test_utils import TestServer

from fleetp2p import config as config_mod
from fleetp2p.agent import Agent


@dataclass
class FakeUpstream:
    """Serves blobs from memory. `faults` is a list consumed one per GET of a blob:
    'error500', 'error429', 'cut', 'stall', 'ignore_range', 'corrupt', 'slow', or None."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    faults: list[str | None] = field(default_factory=list)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
    blob_bytes_sent: int = 0

    def add_blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self.blob)
        app.router.add_route("*", "/v2/{name:.+}/manifests/{ref}", self.manifest)
        return app

    async def manifest(self, request: web.Request) -> web.Response:
        self.log.append((request.method, request.path, request.headers.get("Accept")))
        if self.faults and self.faults[0] in ("error500", "down"):
            self.faults.pop(0)
            return web.Response(status=500)
        entry = self.manifests.get(request.match_info["ref"])
        if entry is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        content, media_type = entry
        digest = "sha256:" + hashlib.sha256(content).hexdigest()
        return web.Response(body=content, headers={"Content-Type": media_type,
                                                   "Docker-Content-Digest": digest})

    async def blob(self, request: web.Request) -> web.StreamResponse:
        self.log.append((request.method, request.path, request.headers.get("Range")))
        data = self.blobs.get(request.match_info["digest"])
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data))})
        fault = self.faults.pop(0) if self.faults else None
        if fault == "error500":
            return web.Response(status=500)
        if fault == "error429":
            return web.Response(status=429, headers={"Retry-After": "0"})
        start = 0
        status = 200
        headers = {"Content-Type": "application/octet-stream"}
        range_header = request.headers.get("Range")
        end = len(data)
        if range_header and fault != "ignore_range":
            first, _, last = range_header.split("=")[1].partition("-")
            start, end = int(first), (int(last) + 1 if last else len(data))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        body = data[start:end]
        if fault == "corrupt":
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        half = len(body) // 2
        for i in range(0, len(body), 65536):
            if fault in ("cut", "stall") and i >= half:
                if fault == "stall":
                    await asyncio.sleep(30)
                request.transport.close()
                return response
            if fault == "slow":
                await asyncio.sleep(0.02)
            chunk = body[i:i + 65536]
            await response.write(chunk)
            self.blob_bytes_sent += len(chunk)
        await response.write_eof()
        return response


@asynccontextmanager
async def running(app: web.Application) -> AsyncIterator[TestServer]:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@asynccontextmanager
async def agent_for(upstream: TestServer, data_dir: Path, **overrides) -> AsyncIterator[tuple[Agent, TestServer]]:
    name = f"127.0.0.1:{upstream.port}"
    settings = {"data_dir": str(data_dir), "upstream_stall_timeout": 1.0, "tracker": "none",
                "upstream_backoff": 0.01,
                "registries": [{"name": name, "url": f"http://{name}"}], **overrides}
    agent = Agent(config_mod.from_dict(settings).validate())
    async with running(agent.build_app()) as server:
        yield agent, server


async def wait_stored(agent: Agent, count: int = 1, timeout: float = 5.0) -> None:
    """The last byte goes out once verified; the commit (fsync, marker) lands just after."""
    for _ in range(int(timeout / 0.02)):
        if len(agent.store.entries()) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{count} blobs not committed after {timeout} s")
