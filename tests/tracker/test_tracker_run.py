"""The standalone entry points: `serve()` in-process and `python -m tracker` as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tracker.client import TrackerClient
from tracker.errors import BackendUnavailable, TrackerUnauthorized
from tracker.redisbackend import RedisBackend
from tracker.run import parse_listen, serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parse_listen():
    assert parse_listen("0.0.0.0:7070") == ("0.0.0.0", 7070)
    assert parse_listen("[::1]:7070") == ("::1", 7070)
    with pytest.raises(ValueError):
        parse_listen("7070")


async def test_serve_with_redis_until_stopped(redis_url):
    port, stop = _free_port(), asyncio.Event()
    task = asyncio.create_task(serve(f"127.0.0.1:{port}", redis_url, "tok",
                                     redis_prefix="run" + uuid.uuid4().hex[:8], stop=stop))
    async with TrackerClient(f"http://127.0.0.1:{port}", token="tok") as c:
        for _ in range(100):
            try:
                health = await c.health()
                break
            except Exception:  # noqa: BLE001 - not listening yet
                await asyncio.sleep(0.02)
        assert health == {"status": "ok", "backend": "redis"}
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_redis_unreachable_fails_fast():
    backend = RedisBackend(f"redis://127.0.0.1:{_free_port()}/0", connect_timeout=0.5)
    with pytest.raises(BackendUnavailable):
        await backend.start()


async def test_python_m_tracker_process():
    port = _free_port()
    env = dict(os.environ, FLEETP2P_TRACKER_TOKEN="envtok")
    proc = subprocess.Popen([sys.executable, "-m", "tracker", "--listen", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async with TrackerClient(f"http://127.0.0.1:{port}", token="envtok") as c:
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert (await c.health())["backend"] == "memory"
                    break
                except AssertionError:
                    raise
                except Exception:  # noqa: BLE001 - still starting
                    assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                    await asyncio.sleep(0.05)
        with pytest.raises(TrackerUnauthorized):
            async with TrackerClient(f"http://127.0.0.1:{port}") as anonymous:
                await anonymous.health()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_negative_lease_limit_is_a_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "tracker", "--listen", "127.0.0.1:0",
                           "--lease-limit", "-1"], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "fleetp2p tracker: --lease-limit must be 0 (no limit) or more"
