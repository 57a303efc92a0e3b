"""Fixtures for the tracker tests: a real redis-server, backends of both kinds, live apps.

The redis-server runs once per session on 127.0.0.1 with a free port and a
temp dir, and is always stopped; each test gets its own key prefix, so tests
never see each other's state.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest
from aiohttp import web

from tracker.backend import Timeouts
from tracker.memory import MemoryBackend
from tracker.server import create_app

# Short TTLs keep expiry tests fast; the code paths are the same as with the defaults.
FAST = Timeouts(lease=0.4, announce=0.6, blob=3600.0, lease_limit=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_server():
    """URL of a private redis-server for the whole session."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    workdir = tempfile.mkdtemp(prefix="fleetp2p-redis-")
    proc = None
    try:
        for _attempt in range(3):                 # the free port may be taken in between
            port = free_port()
            log = open(f"{workdir}/redis.log", "wb")
            proc = subprocess.Popen(
                [exe, "--bind", "127.0.0.1", "--port", str(port), "--dir", workdir,
                 "--save", "", "--appendonly", "no"],
                stdout=log, stderr=subprocess.STDOUT)
            log.close()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and proc.poll() is None and not _redis_ready(port):
                time.sleep(0.02)
            if proc.poll() is None and _redis_ready(port):
                break
            proc.kill()
            proc.wait()
            proc = None
        if proc is None:
            pytest.fail("redis-server did not start: " + open(f"{workdir}/redis.log").read()[-2000:])
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(params=["memory", "redis"])
def backend_kind(request) -> str:
    if request.param == "redis":
        request.getfixturevalue("redis_server")
    return request.param


@pytest.fixture
def redis_url(request) -> str:
    return request.getfixturevalue("redis_server")


@pytest.fixture
async def make_backend(request, backend_kind):
    """factory(timeouts, shared_with=None) → a started backend.

    `shared_with`: a second tracker over the same state — another RedisBackend
    on the same prefix, or the very same MemoryBackend (memory state is
    per-process by design).
    """
    prefix = "t" + uuid.uuid4().hex[:12]
    url = request.getfixturevalue("redis_server") if backend_kind == "redis" else None
    started = []

    async def factory(timeouts: Timeouts = FAST, shared_with=None):
        if backend_kind == "memory":
            if shared_with is not None:
                return shared_with
            backend = MemoryBackend(timeouts)
        else:
            from tracker.redisbackend import RedisBackend
            backend = RedisBackend(url, timeouts, prefix=prefix)
        await backend.start()
        started.append(backend)
        return backend

    yield factory
    for backend in started:
        await backend.close()


@pytest.fixture
async def serve_app():
    """factory(app) → base URL of the app listening on 127.0.0.1:<free port>; cleaned up after."""
    runners = []

    async def factory(app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[-1][1]
        return f"http://127.0.0.1:{port}"

    yield factory
    await asyncio.gather(*(r.cleanup() for r in runners), return_exceptions=True)


@pytest.fixture
async def tracker_app(serve_app):
    """factory(backend, token=None, **create_app kwargs) → base URL of a live tracker."""
    async def factory(backend, token=None, **kwargs) -> str:
        return await serve_app(create_app(backend, token, **kwargs))
    return factory
