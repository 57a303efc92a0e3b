"""Standalone tracker: `run(listen, redis_url, token)` is what `fleetp2p tracker` calls.

Runs on uvloop (the tracker serves small msgpack bodies, never blob bytes,
so uvloop's missing sendfile path costs nothing here) and shuts down cleanly
on SIGINT/SIGTERM: long-polls answer at once, the backend is closed.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop
from aiohttp import web

from tracker.backend import Backend, Timeouts
from tracker.memory import MemoryBackend
from tracker.server import create_app

log = logging.getLogger(__name__)


def parse_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen: expected HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def create_backend(redis_url: str | None = None, timeouts: Timeouts | None = None,
                   redis_prefix: str = "fleetp2p") -> Backend:
    """Memory when no Redis URL is given, else Redis (import deferred: embedding agents need no redis)."""
    if not redis_url:
        return MemoryBackend(timeouts)
    from tracker.redisbackend import RedisBackend
    return RedisBackend(redis_url, timeouts, prefix=redis_prefix)


async def serve(listen: str, redis_url: str | None = None, token: str | None = None, *,
                timeouts: Timeouts | None = None, redis_prefix: str = "fleetp2p",
                stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set (or SIGINT/SIGTERM when no event is given)."""
    host, port = parse_listen(listen)
    app = create_app(create_backend(redis_url, timeouts, redis_prefix), token)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        log.info("tracker listening on %s (backend %s, auth %s)", listen,
                 "redis" if redis_url else "memory", "on" if token else "off")
        if stop is None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(listen: str, redis_url: str | None = None, token: str | None = None, *,
        lease_ttl: float = 15.0, announce_ttl: float = 30.0, blob_ttl: float = 7 * 24 * 3600.0,
        lease_limit: int = Timeouts.lease_limit, redis_prefix: str = "fleetp2p") -> None:
    """Blocking entry point for the CLI."""
    timeouts = Timeouts(lease=lease_ttl, announce=announce_ttl, blob=blob_ttl,
                        lease_limit=lease_limit)
    uvloop.run(serve(listen, redis_url, token, timeouts=timeouts, redis_prefix=redis_prefix))
