"""Redis-only behaviour: the event subscription survives a dropped connection; contention."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import redis.asyncio as aioredis

from tracker.backend import Timeouts
from tracker.models import DEFAULT_SEGMENT_SIZE as SEG
from tracker.redisbackend import RedisBackend


def dg(n: object) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


async def _pair(redis_url):
    prefix = "r" + uuid.uuid4().hex[:10]
    a = RedisBackend(redis_url, Timeouts(lease=5, lease_limit=0), prefix=prefix)
    b = RedisBackend(redis_url, Timeouts(lease=5, lease_limit=0), prefix=prefix)
    await a.start()
    await b.start()
    return a, b


async def test_waiters_survive_a_dropped_subscription(redis_url):
    a, b = await _pair(redis_url)
    admin = aioredis.from_url(redis_url)
    try:
        d = dg("reconnect")
        await a.register(d, 2 * SEG)
        waiter = asyncio.create_task(b.wait(d, 0, 10))
        await asyncio.sleep(0.05)
        assert await admin.client_kill_filter(_type="pubsub") >= 2   # both trackers' subscriptions
        await a.publish(d, 0, "n", b"d4:infoe")                   # may land in the gap
        rec = await asyncio.wait_for(waiter, 3)
        assert rec.version == 1
        for _ in range(100):                                      # and the subscription is back
            if b._subscribed.is_set():
                break
            await asyncio.sleep(0.02)
        waiter = asyncio.create_task(b.wait(d, 1, 10))
        await asyncio.sleep(0.05)
        await a.publish(d, 1, "n", b"d5:info2e")
        assert (await asyncio.wait_for(waiter, 1)).version == 2
    finally:
        await admin.aclose()
        await a.close()
        await b.close()


async def test_no_segment_granted_twice_under_contention(redis_url):
    a, b = await _pair(redis_url)
    try:
        digests = [dg(f"contend{i}") for i in range(20)]
        for d in digests:
            await a.register(d, 8 * SEG)
        claims = [(a if n % 2 else b).claim(d, f"n{n}", count=1 + n % 3)
                  for d in digests for n in range(8)]
        grants = await asyncio.gather(*claims)
        per_blob: dict[str, list[int]] = {}
        for g in grants:
            per_blob.setdefault(g.digest, []).extend(g.granted)
        for d in digests:
            assert sorted(per_blob[d]) == list(range(8))
    finally:
        await a.close()
        await b.close()
