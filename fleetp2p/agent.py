"""The agent process: wires store, upstream client, swarm, tracker client and
registry front into one aiohttp application and runs it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fleetp2p import __version__
from fleetp2p.admin import add_admin_routes
from fleetp2p.config import Config, parse_size
from fleetp2p.fetch import BlobFetcher, ManifestService
from fleetp2p.fetch.cooperative import Fleet
from fleetp2p.metrics import Metrics
from fleetp2p.lazy.reads import LazyReads
from fleetp2p.peering import peerhttp, seeding
from fleetp2p.peering.peerhttp import PeerReader
from fleetp2p.peering.announcer import Announcer
from fleetp2p.peering.node import load_node_id
from fleetp2p.registry.app import RegistryFront
from fleetp2p.store import BlobStore, TagCache
from fleetp2p.swarm import Swarm
from fleetp2p.upstream import UpstreamClient
from tracker.client import TrackerClient
from tracker.models import Node

log = logging.getLogger("fleetp2p.agent")

ADMIN_PREFIX = "/_fleetp2p"
TRACKER_TIMEOUT = 2.0


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
        self.blobs = BlobFetcher(self.store, self.upstream, self.metrics, config.geometry,
                                 swarm_min_size=parse_size(config.swarm_min_size, "swarm_min_size"),
                                 release_page_cache=config.release_page_cache)
        self.lazy = LazyReads(config.data_dir, self.manifests.lazy_layers, self.upstream, self.metrics,
                              prefetch=config.lazy_prefetch)
        self.front = RegistryFront(self.manifests, self.blobs, self.metrics, config.default_registry,
                                   self.lazy, config.registry_in_path)
        self.peer_reader: PeerReader | None = None
        self._peer_site: web.AppRunner | None = None
        self.swarm: Swarm | None = None
        self.tracker: TrackerClient | None = None
        self.announcer: Announcer | None = None
        self.node: Node | None = None
        self._tasks: list[asyncio.Task] = []
        self._tracker_site: web.AppRunner | None = None

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        self.front.add_routes(app)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get(f"{ADMIN_PREFIX}/health", self.handle_health)
        add_admin_routes(app, self)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    # Lifecycle ------------------------------------------------------------

    async def _startup(self, app: web.Application) -> None:
        await asyncio.to_thread(self.store.open)
        await asyncio.to_thread(self.lazy.open_dir)
        if self.config.tracker_url is not None:
            await self._start_peering()

    async def _start_peering(self) -> None:
        config = self.config
        if config.tracker == "embedded":
            await self._start_embedded_tracker()
        self.swarm = Swarm(config.peer_listen, self.metrics)
        await self.swarm.start()
        self.tracker = TrackerClient(config.tracker_url, config.tracker_token or None,
                                     timeout=TRACKER_TIMEOUT)
        node_id = await asyncio.to_thread(load_node_id, config.data_dir)
        host = advertise_host(config)
        http_port = await self._start_peer_site()
        self.node = Node(node_id, host, self.swarm.port, http=f"http://{host}:{http_port}",
                         labels=config.labels())
        self.announcer = Announcer(self.tracker, self.node, self.metrics)
        self.peer_reader = PeerReader(self.tracker, node_id, self.announcer, self.metrics,
                                      config.tracker_token or None)
        self.lazy.peers = self.peer_reader
        self.blobs.fleet = Fleet(self.tracker, self.swarm, self.upstream, self.store, self.metrics,
                                 self.announcer, node_id, config.labels(),
                                 peer_stall_timeout=config.peer_stall_timeout,
                                 peer_reader=self.peer_reader)
        found = await asyncio.to_thread(seeding.stored_metainfo, self.store)
        seeding.restore(self.store, self.swarm, self.announcer, found)
        loop = asyncio.get_running_loop()
        self.store.on_remove.append(lambda digest: loop.call_soon_threadsafe(self._forget, str(digest)))
        await self.announcer.announce_once()
        self._tasks.append(asyncio.create_task(self.announcer.run(), name="announcer"))
        log.info("node %s: peers on %s:%d, tracker %s (%s)", node_id, self.node.host, self.node.port,
                 config.tracker_url, "reachable" if self.announcer.reachable else "unreachable")

    async def _start_embedded_tracker(self) -> None:
        """Bound before anything announces, and a clear error if the port is taken."""
        from tracker.backend import Timeouts
        from tracker.run import create_backend
        from tracker.server import create_app

        config = self.config
        backend = create_backend(config.tracker_redis or None,
                                 Timeouts(lease_limit=config.tracker_lease_limit))
        runner = web.AppRunner(create_app(backend, config.tracker_token or None), access_log=None)
        await runner.setup()
        host, port = config.tracker_listen.rpartition(":")[::2]
        try:
            await web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True).start()
        except OSError as e:
            await runner.cleanup()
            raise SystemExit(f"fleetp2p: cannot listen on {config.tracker_listen} "
                             f"(tracker_listen, embedded tracker): {e.strerror}") from None
        self._tracker_site = runner

    async def _start_peer_site(self) -> int:
        """Other nodes reach only this small app, never the mirror or the admin API."""
        lookup = peerhttp.store_lookup(self.store, self.lazy.blob, self.blobs.download)
        runner = web.AppRunner(peerhttp.peer_app(lookup, self.metrics, self.config.tracker_token or None),
                               access_log=None)
        await runner.setup()
        host, port = self.config.peer_http_hostport
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise SystemExit(f"fleetp2p: cannot listen on {host}:{port} (peer_http_listen): "
                             f"{e.strerror}") from None
        self._peer_site = runner
        return runner.addresses[0][1]

    def _forget(self, digest: str) -> None:
        if self.swarm is not None:
            self.swarm.remove_blob(digest)
        if self.announcer is not None:
            self.announcer.drop(digest)

    async def _cleanup(self, app: web.Application) -> None:
        for download in self.blobs.inflight():
            if download.task is not None:
                download.task.cancel()
        if self.announcer is not None:
            await self.announcer.leave()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tracker_site is not None:
            await self._tracker_site.cleanup()
        self.lazy.close()
        if self.peer_reader is not None:
            await self.peer_reader.close()
        if self._peer_site is not None:
            await self._peer_site.cleanup()
        if self.swarm is not None:
            await self.swarm.close()
        if self.tracker is not None:
            await self.tracker.close()
        await self.upstream.close()

    # Endpoints ------------------------------------------------------------

    async def handle_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__})


def advertise_host(config: Config) -> str:
    """The address peers should dial: explicit, else the peer listener's, else
    the source address this host uses towards the tracker."""
    if config.advertise_addr:
        return config.advertise_addr
    host = config.peer_listen.rpartition(":")[0].strip("[]")
    if host not in ("0.0.0.0", "::", ""):
        return host
    target = urlsplit(config.tracker_url or "http://127.0.0.1").hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((target, 9))  # UDP connect sends nothing; it only picks a route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


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
