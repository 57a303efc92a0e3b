"""The agent process: wires store, upstream client, fetch path and registry
front into one aiohttp application and runs it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fleetp2p import __version__
from fleetp2p.admin import add_admin_routes
from fleetp2p.config import Config
from fleetp2p.fetch import BlobFetcher, ManifestService
from fleetp2p.metrics import Metrics
from fleetp2p.registry.app import RegistryFront
from fleetp2p.store import BlobStore, TagCache
from fleetp2p.upstream import UpstreamClient

log = logging.getLogger("fleetp2p.agent")

ADMIN_PREFIX = "/_fleetp2p"


class Agent:
    """Everything one node runs, built from its config."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.store = BlobStore(config.data_dir, config.store_limit_bytes(),
                               config.store_high_watermark, config.store_low_watermark, self.metrics)
        self.tags = TagCache(config.data_dir, config.tag_ttl)
        self.upstream = UpstreamClient(config, self.metrics)
        self.manifests = ManifestService(self.store, self.tags, self.upstream, self.metrics)
        self.blobs = BlobFetcher(self.store, self.upstream, self.metrics, config.geometry)
        self.front = RegistryFront(self.manifests, self.blobs, self.metrics, config.default_registry)

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        self.front.add_routes(app)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get(f"{ADMIN_PREFIX}/health", self.handle_health)
        add_admin_routes(app, self)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        await asyncio.to_thread(self.store.open)

    async def _cleanup(self, app: web.Application) -> None:
        for download in self.blobs.inflight():
            if download.task is not None:
                download.task.cancel()
        await self.upstream.close()

    async def handle_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__})


async def serve(config: Config) -> None:
    agent = Agent(config)
    runner = web.AppRunner(agent.build_app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.listen_host, config.listen_port, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise SystemExit(f"fleetp2p: cannot listen on {config.listen}: {e.strerror}") from None
    log.info("fleetp2p %s agent: OCI mirror on http://%s, data in %s, default registry %s",
             __version__, config.listen, config.data_dir, config.default_registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()
