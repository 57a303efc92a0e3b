"""kill -9 of the agent in the middle of a download, then a restart: nothing
half-written is ever served, and the restarted agent asks upstream only for
the bytes that were not on disk yet."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp

from tests.inprocess import FakeUpstream, running

BLOB = os.urandom(8 * 1024 * 1024)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 10
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "agent exited early"
            try:
                async with session.get(url + "/v2/") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError("agent did not start")


def start_agent(port: int, upstream_port: int, data_dir) -> subprocess.Popen:
    name = f"127.0.0.1:{upstream_port}"
    return subprocess.Popen([sys.executable, "-m", "fleetp2p", "agent", "--listen", f"127.0.0.1:{port}",
                             "--data-dir", str(data_dir), "--tracker", "none", "--registry", f"{name}=http://{name}"],
                            stderr=subprocess.PIPE)


async def test_kill9_mid_download_then_restart(tmp_path):
    upstream = FakeUpstream()
    digest = upstream.add_blob(BLOB)
    upstream.faults = ["slow"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = tmp_path / "data"
    async with running(upstream.app()) as up:
        agent = start_agent(port, up.port, data_dir)
        try:
            await wait_ready(url, agent)
            received = 0
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{url}/v2/app/blobs/{digest}") as resp:
                    assert resp.status == 200
                    try:
                        async for chunk in resp.content.iter_any():
                            received += len(chunk)
                            if received > len(BLOB) // 4:
                                agent.send_signal(signal.SIGKILL)
                                agent.wait()
                        raise AssertionError("body completed although the agent was killed")
                    except aiohttp.ClientPayloadError:
                        pass
            assert 0 < received < len(BLOB)
            blob_dir = data_dir / "blobs" / "sha256" / digest.split(":")[1]
            assert list(blob_dir.iterdir()), "the partial download should be on disk"
            assert not (blob_dir / "complete").exists()

            sent = upstream.blob_bytes_sent
            agent = start_agent(port, up.port, data_dir)
            await wait_ready(url, agent)
            assert (blob_dir / "partial").exists(), "restart must keep the download to resume"
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{url}/v2/app/blobs/{digest}") as resp:
                    body = await resp.read()
            assert hashlib.sha256(body).hexdigest() == digest.split(":")[1]
            again = upstream.blob_bytes_sent - sent
            print(f"the client had {received} bytes when the agent died; upstream then sent "
                  f"{again} of {len(BLOB)}")
            assert again <= len(BLOB) - received
            for _ in range(100):  # the marker lands just after the last byte went out
                if (blob_dir / "complete").exists():
                    break
                await asyncio.sleep(0.05)
            assert (blob_dir / "complete").exists() and not (blob_dir / "partial").exists()
        finally:
            if agent.poll() is None:
                agent.terminate()
                agent.wait(10)
