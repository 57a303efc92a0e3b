"""The HTTP API through real listening servers on 127.0.0.1 and the real client."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import aiohttp
import msgpack
import pytest
from aiohttp import web

from tracker.backend import Timeouts
from tracker.client import TrackerClient
from tracker.errors import (BackendUnavailable, TrackerConflict, TrackerError, TrackerNotFound,
                            TrackerUnauthorized, TrackerUnavailable)
from tracker.memory import MemoryBackend
from tracker.models import DEFAULT_SEGMENT_SIZE as SEG, MiB, Node, info_hash
from tracker.redisbackend import RedisBackend
from tracker.server import create_app

FAST = Timeouts(lease=0.4, announce=0.6, lease_limit=0)
META = [f"d6:lengthi{i}e4:name1:{i}e".encode() for i in range(16)]


def dg(n: object) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


def node(name: str, zone: str = "z1") -> Node:
    return Node(name, "127.0.0.1", 6881, f"http://127.0.0.1:5050/{name}", {"zone": zone})


@pytest.fixture
async def clients():
    made = []

    def factory(url: str, **kwargs) -> TrackerClient:
        made.append(TrackerClient(url, **kwargs))
        return made[-1]

    yield factory
    for c in made:
        await c.close()


async def two_redis_trackers(tracker_app, redis_url, timeouts=FAST):
    prefix = "api" + uuid.uuid4().hex[:10]
    url_a = await tracker_app(RedisBackend(redis_url, timeouts, prefix=prefix))
    url_b = await tracker_app(RedisBackend(redis_url, timeouts, prefix=prefix))
    return url_a, url_b


async def test_full_flow_through_client(tracker_app, clients):
    c = clients(await tracker_app(MemoryBackend(FAST)))
    d = dg("flow")
    assert await c.health() == {"status": "ok", "backend": "memory"}
    assert await c.get_blob(d) is None
    rec = await c.register(d, 3 * SEG + 5)
    assert rec.segment_count == 4 and rec.segment_span(3) == (3 * SEG, 3 * SEG + 5)
    grant = await c.claim(d, "a", count=2)
    assert grant.granted == [0, 1] and grant.ttl == FAST.lease
    assert (await c.claim(d, "b", segments=[1, 2])).holders == {0: "a", 1: "a"}
    assert (await c.renew(d, "a", [0, 1, 2])).lost == [2]
    assert await c.release(d, "a", [1]) == [1]
    reply = await c.announce(node("a"), {d: [0]}, full=True)
    assert reply.ttl == FAST.announce and not reply.resync
    await c.announce(node("b"), {d: "all"})
    rec = await c.publish(d, 0, "a", META[0])
    assert rec.version == 1 and rec.segments[0].metainfo == META[0]
    peers = await c.peers(d, node="a", segment=0)
    assert [p.node_id for p in peers] == ["b"] and peers[0].complete
    assert (await c.wait(d, 0, timeout=1)).version == 1
    rec = await c.withdraw(d, 0, info_hash=info_hash(META[0]))
    assert rec.version == 2 and rec.segments == {}
    await c.announce(node("c"), {}, fetching=[d])
    peers = {p.node_id: p for p in await c.peers(d)}
    assert peers["c"].fetching and not peers["c"].segments and not peers["b"].fetching
    assert await c.leave("a") is True and await c.leave("c") is True
    assert [p.node_id for p in await c.peers(d)] == ["b"]


async def test_errors_are_msgpack_with_codes(tracker_app, clients):
    url = await tracker_app(MemoryBackend())
    c = clients(url)
    d = dg("errors")
    with pytest.raises(TrackerError) as e:
        await c.register("sha256:nothex", 1)
    assert e.value.status == 400 and e.value.code == "BAD_REQUEST"
    with pytest.raises(TrackerNotFound):
        await c.claim(d, "a")
    await c.register(d, SEG)
    with pytest.raises(TrackerConflict) as e:
        await c.register(d, 1)
    assert e.value.code == "SIZE_MISMATCH"
    await c.publish(d, 0, "a", META[0])
    with pytest.raises(TrackerConflict):
        await c.publish(d, 0, "a", META[1])
    for bad in (lambda: c.publish(d, 1, "a", META[1]),      # index out of range
                lambda: c.claim(d, "bad node id"),
                lambda: c.peers(d, limit=0),
                lambda: c.announce(node("a"), {}, fetching=["sha256:nothex"]),
                lambda: c.register(d, SEG, segment_size=3 * MiB),
                lambda: c.wait(d, 0, timeout=3600)):
        with pytest.raises(TrackerError) as e:
            await bad()
        assert e.value.status == 400
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{url}/v1/blobs/{d}", data=b"\xc1garbage",
                         headers={"Content-Type": "application/msgpack"}) as r:
            body = msgpack.unpackb(await r.read())
            assert r.status == 400 and body["error"] == "BAD_REQUEST" and body["message"]
        async with s.put(f"{url}/v1/blobs/{d}", json={"size": 1}) as r:
            assert r.status == 415
        async with s.get(f"{url}/v1/nothing") as r:
            assert r.status == 404 and r.content_type == "application/msgpack"
            assert msgpack.unpackb(await r.read())["error"] == "NOT_FOUND"
        async with s.get(f"{url}/v1/blobs/{dg('unknown')}/wait?since=0") as r:
            assert r.status == 404 and msgpack.unpackb(await r.read())["error"] == "BLOB_UNKNOWN"


async def test_token_required(tracker_app, clients):
    url = await tracker_app(MemoryBackend(), token="s3cret")
    with pytest.raises(TrackerUnauthorized) as e:
        await clients(url).health()
    assert e.value.status == 401 and e.value.code == "UNAUTHORIZED"
    with pytest.raises(TrackerUnauthorized):
        await clients(url, token="wrong").register(dg("t"), 1)
    assert (await clients(url, token="s3cret").register(dg("t"), 1)).size == 1
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/v1/blobs/{dg('t')}") as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
            assert msgpack.unpackb(await r.read())["error"] == "UNAUTHORIZED"
        for open_path in ("/healthz", "/metrics"):
            async with s.get(url + open_path) as r:
                assert r.status == 200


async def test_unavailable_vs_error(tracker_app, clients, serve_app):
    with pytest.raises(TrackerUnavailable):                   # nothing listening
        await clients("http://127.0.0.1:9", timeout=1).get_blob(dg("x"))

    class Down(MemoryBackend):
        async def get_blob(self, digest):
            raise BackendUnavailable("redis: connection refused")

        async def ping(self):
            raise BackendUnavailable("redis: connection refused")

    c = clients(await tracker_app(Down()))
    with pytest.raises(TrackerUnavailable, match="503"):
        await c.get_blob(dg("x"))
    with pytest.raises(TrackerUnavailable):
        await c.health()

    async def slow(request):
        await asyncio.sleep(0.5)
        return web.Response()

    app = web.Application()
    app.router.add_get("/v1/blobs/{digest}", slow)
    with pytest.raises(TrackerUnavailable):
        await clients(await serve_app(app), timeout=0.2).get_blob(dg("x"))


async def test_metrics(tracker_app, clients):
    url = await tracker_app(MemoryBackend(FAST))
    c = clients(url)
    d = dg("metrics")
    await c.register(d, 2 * SEG)
    await c.claim(d, "a")
    await c.claim(d, "a")                                       # renewal: not counted again
    await asyncio.sleep(FAST.lease + 0.1)
    await c.announce(node("a"), {d: "all"})
    assert (await c.claim(d, "b")).reclaimed == [0]
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            text = await r.text()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values["fleetp2p_tracker_leases_granted_total"] == 2
    assert values["fleetp2p_tracker_leases_reclaimed_total"] == 1
    assert values["fleetp2p_tracker_announces_total"] == 1
    assert values["fleetp2p_tracker_blobs"] == 1 and values["fleetp2p_tracker_nodes"] == 1
    key = ('fleetp2p_tracker_request_duration_seconds_count'
           '{endpoint="/v1/blobs/{digest}/leases",method="POST"}')
    assert values[key] == 3
    assert "sha256:" not in text and 'node="' not in text


async def test_two_trackers_on_one_redis(tracker_app, clients, redis_url):
    url_a, url_b = await two_redis_trackers(tracker_app, redis_url)
    a, b = clients(url_a), clients(url_b)
    d = dg("shared")
    await a.register(d, 2 * SEG)
    await a.announce(node("seed"), {d: "all"})
    assert [p.node_id for p in await b.peers(d, node="leecher")] == ["seed"]
    waiter = asyncio.create_task(b.wait(d, 0, timeout=10))
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await a.publish(d, 1, "seed", META[1])
    rec = await asyncio.wait_for(waiter, 3)
    assert rec.version == 1 and 1 in rec.segments and loop.time() - start < 1


async def test_concurrent_claims_across_trackers(tracker_app, clients, redis_url):
    url_a, url_b = await two_redis_trackers(tracker_app, redis_url)
    pair = [clients(url_a), clients(url_b)]
    d = dg("race")
    await pair[0].register(d, 8 * SEG)
    grants = await asyncio.gather(*(pair[i % 2].claim(d, f"node{i}") for i in range(8)))
    granted = sorted(s for g in grants for s in g.granted)
    assert granted == list(range(8))
    assert all(len(g.granted) == 1 for g in grants)


async def test_lease_expiry_releases_to_next_claimer(tracker_app, clients, redis_url):
    url_a, url_b = await two_redis_trackers(tracker_app, redis_url)
    a, b = clients(url_a), clients(url_b)
    d = dg("expiry")
    await a.register(d, SEG)
    assert (await a.claim(d, "dies")).granted == [0]
    assert (await b.claim(d, "waits")).granted == []
    await asyncio.sleep(FAST.lease + 0.15)
    g = await b.claim(d, "waits")
    assert g.granted == [0] and g.reclaimed == [0]
    assert (await a.renew(d, "dies", [0])).lost == [0]


async def test_embedded_as_subapp(serve_app, clients):
    async def registry(request):
        return web.Response(text="registry")

    parent = web.Application()
    parent.router.add_get("/v2/", registry)
    parent.add_subapp("/tracker/", create_app(MemoryBackend(), token="t"))
    c = clients(await serve_app(parent) + "/tracker", token="t")
    d = dg("embedded")
    await c.register(d, 1)
    assert (await c.get_blob(d)).size == 1
    assert (await c.health())["backend"] == "memory"


async def test_shutdown_answers_long_polls(clients):
    app = create_app(MemoryBackend())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    c = clients(f"http://127.0.0.1:{runner.addresses[-1][1]}")
    d = dg("shutdown")
    await c.register(d, 1)
    waiter = asyncio.create_task(c.wait(d, 0, timeout=50))
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await runner.cleanup()
    assert (await waiter).version == 0 and loop.time() - start < 3
