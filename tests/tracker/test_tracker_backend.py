"""The backend specification, run against both backends (memory and a real Redis).

`make_backend(shared_with=b)` gives a second tracker over the same state: for
Redis another process-like backend on the same keys, for memory the same
object — so the cross-tracker tests hold for both.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from tracker.backend import Timeouts
from tracker.errors import BadRequest, BlobUnknown, Conflict
from tracker.models import ALL, DEFAULT_SEGMENT_SIZE as SEG, MiB, Node, info_hash


def dg(n: object) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


def node(name: str, zone: str | None = None, rack: str | None = None, port: int = 6881) -> Node:
    labels = {k: v for k, v in (("zone", zone), ("rack", rack)) if v}
    return Node(name, "10.0.0.1", port, f"http://{name}:5050", labels)


META = [f"d6:lengthi{i}e4:name1:{i}e".encode() for i in range(300)]   # distinct fake info dicts


async def test_register_is_idempotent_and_first_writer_wins(make_backend):
    b = await make_backend()
    d = dg("reg")
    rec, created = await b.register(d, 200 * MiB, segment_size=32 * MiB, piece_size=512 * 1024)
    assert created and (rec.segment_size, rec.piece_size, rec.segment_count) == (32 * MiB, 512 * 1024, 7)
    assert rec.version == 0 and rec.segments == {}
    again, created = await b.register(d, 200 * MiB)           # other geometry proposals are ignored
    assert not created and again == rec
    with pytest.raises(Conflict):
        await b.register(d, 201 * MiB)
    assert await b.get_blob(d) == rec
    assert await b.get_blob(dg("nope")) is None


async def test_default_geometry(make_backend):
    b = await make_backend()
    rec, _ = await b.register(dg("g"), 20 * 1000**3)          # 20 GB: segments grow past the default
    assert rec.segment_size == 128 * MiB and rec.piece_size == MiB // 8 and rec.segment_count <= 256
    tiny, _ = await b.register(dg("tiny"), 10)
    assert (tiny.segment_size, tiny.piece_size, tiny.segment_count) == (SEG, MiB // 8, 1)
    empty, _ = await b.register(dg("empty"), 0)
    assert empty.segment_count == 0 and empty.complete


async def test_claimers_get_different_segments(make_backend):
    b = await make_backend()
    d = dg("cold")
    await b.register(d, 4 * SEG)
    a = await b.claim(d, "a")
    c = await b.claim(d, "c")
    assert a.granted == [0] and c.granted == [1]
    assert c.holders == {0: "a"} and a.ttl == b.timeouts.lease
    e = await b.claim(d, "e", count=5)                        # asks for 5, gets the 2 left
    assert e.granted == [2, 3] and e.holders == {0: "a", 1: "c"}
    assert (await b.claim(d, "f")).granted == []
    again = await b.claim(d, "a")                             # a retried claim renews, no new lease
    assert again.granted == [0] and again.renewed == [0]


async def test_lease_limit_per_blob(make_backend):
    b = await make_backend(Timeouts(lease=0.4, announce=0.6, blob=3600.0, lease_limit=2))
    d = dg("limited")
    await b.register(d, 6 * SEG)
    assert (await b.claim(d, "a", count=3)).granted == [0, 1]   # the limit, not the count
    assert (await b.claim(d, "c")).granted == []                  # waits: segments 0, 1 are out
    assert (await b.claim(d, "a", count=3)).granted == [0, 1]   # renews, still no third
    await b.publish(d, 0, "a", META[0])                          # a published lease frees a slot
    assert (await b.claim(d, "c")).granted == [2]
    await b.release(d, "a")
    assert (await b.claim(d, "e", count=5)).granted == [1]
    await asyncio.sleep(0.5)                                      # expired leases count no more
    assert (await b.claim(d, "f", count=5)).granted == [1, 2]


async def test_a_refused_claim_says_when_the_soonest_other_lease_ends(make_backend):
    b = await make_backend(Timeouts(lease=2.0, announce=0.6, blob=3600.0, lease_limit=2))
    d = dg("ends")
    await b.register(d, 4 * SEG)
    first = await b.claim(d, "a")
    assert first.granted == [0] and first.expires_in is None     # nobody else holds one
    await asyncio.sleep(0.5)
    second = await b.claim(d, "c")
    assert second.granted == [1] and 0.9 < second.expires_in <= 1.5   # a's lease, half a second on
    refused = await b.claim(d, "e")                               # the limit: 2 leases out
    assert refused.granted == [] and refused.expires_in == pytest.approx(second.expires_in, abs=0.2)
    assert (await b.claim(d, "a")).expires_in > 1.7               # its own lease is not counted
    await b.publish(d, 0, "a", META[0])
    await b.publish(d, 1, "c", META[1])
    assert (await b.claim(d, "e")).expires_in is None             # published leases end nothing


async def test_claim_wanted_segments_in_order(make_backend):
    b = await make_backend()
    d = dg("want")
    await b.register(d, 8 * SEG)
    g = await b.claim(d, "a", segments=[5, 2, 7], count=2)
    assert g.granted == [5, 2]
    assert (await b.claim(d, "b", segments=[2, 7])).granted == [7]
    with pytest.raises(BadRequest):
        await b.claim(d, "a", segments=[8])
    with pytest.raises(BlobUnknown):
        await b.claim(dg("unknown"), "a")


async def test_publish_clears_lease_and_bumps_version(make_backend):
    b = await make_backend()
    d = dg("pub")
    await b.register(d, 3 * SEG)
    await b.claim(d, "a", count=3)
    rec = await b.publish(d, 1, "a", META[1])
    assert rec.version == 1 and rec.segments[1].node == "a"
    assert rec.segments[1].info_hash == info_hash(META[1]) and rec.segments[1].metainfo == META[1]
    assert (await b.publish(d, 1, "b", META[1])).version == 1   # same bytes: no-op
    with pytest.raises(Conflict):
        await b.publish(d, 1, "b", META[2])
    with pytest.raises(BadRequest):
        await b.publish(d, 3, "a", META[3])
    renewal = await b.renew(d, "a", [0, 1, 2])
    assert renewal.renewed == [0, 2] and renewal.lost == [1]
    assert (await b.claim(d, "z", count=3)).granted == []      # 0, 2 leased, 1 published
    await b.release(d, "a", [0])
    assert (await b.claim(d, "z", count=3)).granted == [0]


async def test_renew_and_release(make_backend):
    b = await make_backend()
    d = dg("renew")
    await b.register(d, 4 * SEG)
    await b.claim(d, "a", count=2)
    await b.claim(d, "b", count=2)
    r = await b.renew(d, "a", [0, 1, 2])
    assert r.renewed == [0, 1] and r.lost == [2]
    assert await b.release(d, "a") == [0, 1]
    assert await b.release(d, "a") == []
    assert await b.release(d, "b", [3]) == [3]
    assert (await b.claim(d, "c", count=4)).granted == [0, 1, 3]


async def test_expired_lease_is_reclaimed(make_backend):
    b = await make_backend()
    d = dg("expire")
    await b.register(d, 2 * SEG)
    assert (await b.claim(d, "dead")).granted == [0]
    assert (await b.claim(d, "x")).granted == [1]
    await asyncio.sleep(b.timeouts.lease + 0.15)
    g = await b.claim(d, "next", count=2)
    assert g.granted == [0, 1] and g.reclaimed == [0, 1]
    lost = await b.renew(d, "dead", [0])
    assert lost.renewed == [] and lost.lost == [0]


async def test_slow_holder_keeps_lease_nobody_took(make_backend):
    b = await make_backend()
    d = dg("slow")
    await b.register(d, SEG)
    await b.claim(d, "slow")
    await asyncio.sleep(b.timeouts.lease + 0.15)
    assert (await b.renew(d, "slow", [0])).renewed == [0]


async def test_withdraw_removes_metainfo_and_holdings(make_backend):
    b = await make_backend()
    d = dg("withdraw")
    await b.register(d, 3 * SEG)
    await b.announce(node("full"), {d: ALL})
    await b.announce(node("part"), {d: frozenset({1, 2})})
    await b.publish(d, 1, "pub", META[1])
    with pytest.raises(Conflict):
        await b.withdraw(d, 1, info_hash=info_hash(META[9]))
    rec = await b.withdraw(d, 1, info_hash=info_hash(META[1]))
    assert 1 not in rec.segments and rec.version == 2
    assert (await b.withdraw(d, 1)).version == 2             # nothing published: unchanged
    peers = {p.node_id: p for p in await b.peers(d)}
    assert not peers["full"].complete and peers["full"].segments == (0, 2)
    assert peers["part"].segments == (2,)
    assert await b.peers(d, segment=1) == []
    assert (await b.claim(d, "again", segments=[1])).granted == [1]   # claimable again


async def test_announce_and_peer_selection(make_backend):
    b = await make_backend()
    d = dg("peers")
    await b.register(d, 4 * SEG)
    await b.announce(node("me", "z1", "r1"), {d: frozenset({0})})
    await b.announce(node("far-full", "z2", "r1"), {d: ALL})
    await b.announce(node("zone-part", "z1", "r9"), {d: frozenset({2, 3})})
    await b.announce(node("rack-part", "z1", "r1"), {d: frozenset({3})})
    await b.announce(node("zone-full", "z1", "r9"), {d: ALL})
    order = [p.node_id for p in await b.peers(d, "me")]       # zone/rack from my announce
    assert order == ["rack-part", "zone-full", "zone-part", "far-full"]
    seg2 = [p.node_id for p in await b.peers(d, "me", segment=2)]
    assert seg2 == ["zone-full", "zone-part", "far-full"]
    explicit = [p.node_id for p in await b.peers(d, "me", zone="z2")]
    assert explicit[0] == "far-full"
    assert len(await b.peers(d, "me", limit=2)) == 2
    peer = next(p for p in await b.peers(d) if p.node_id == "zone-part")
    assert (peer.host, peer.port, peer.http, peer.labels) == ("10.0.0.1", 6881, "http://zone-part:5050",
                                                              {"zone": "z1", "rack": "r9"})
    assert peer.has(2) and not peer.has(0)
    with pytest.raises(BadRequest):
        await b.peers(d, segment=4)


async def test_downloaders_are_swarm_peers_after_holders(make_backend):
    b = await make_backend()
    d, other = dg("fetching"), dg("elsewhere")
    await b.register(d, 4 * SEG)
    await b.announce(node("seed"), {d: ALL})
    await b.announce(node("part"), {d: frozenset({1})}, fetching=[d])
    await b.announce(node("new"), {}, fetching=[d, other])
    await b.announce(node("me"), {}, fetching=[d])
    peers = await b.peers(d, "me", segment=2)       # nobody but the seed holds segment 2
    assert [p.node_id for p in peers] == ["seed", "part", "new"]
    assert [p.fetching for p in peers] == [False, True, True]
    assert peers[2].segments == () and not peers[2].has(2)
    assert [p.node_id for p in await b.peers(other)] == ["new"]
    await b.announce(node("new"), {})                # every announce replaces the fetching set
    await b.announce(node("part"), {d: frozenset({1})})
    assert [p.node_id for p in await b.peers(d, "me", segment=2)] == ["seed"]
    assert [p.node_id for p in await b.peers(d, "me", segment=1)] == ["seed", "part"]
    assert await b.peers(other) == []
    await b.announce(node("gone"), {}, fetching=[d])
    await b.leave("gone")
    assert "gone" not in {p.node_id for p in await b.peers(d)}
    for i in range(6):                               # holders of other segments rank after
        await b.announce(node(f"busy{i}"), {d: frozenset({0})}, fetching=[d])
    assert [p.node_id for p in await b.peers(d, "me", segment=2, limit=1)] == ["seed"]


async def test_peer_sample_is_random(make_backend):
    b = await make_backend()
    d = dg("random")
    for i in range(12):
        await b.announce(node(f"n{i}"), {d: ALL})
    firsts = {(await b.peers(d, limit=3))[0].node_id for _ in range(20)}
    assert len(firsts) > 3


async def test_announce_full_replace_removed_and_resync(make_backend):
    b = await make_backend()
    d1, d2, d3 = dg(1), dg(2), dg(3)
    first = await b.announce(node("n"), {d1: ALL, d2: ALL})
    assert first.resync and first.ttl == b.timeouts.announce and first.interval == b.timeouts.announce / 2
    assert not (await b.announce(node("n"), {})).resync
    await b.announce(node("n"), {d3: frozenset({0})}, full=True)
    assert await b.peers(d1) == [] and [p.node_id for p in await b.peers(d3)] == ["n"]
    await b.announce(node("n"), {d1: ALL})                    # incremental: d3 kept
    await b.announce(node("n"), {}, removed=[d3])
    assert await b.peers(d3) == [] and len(await b.peers(d1)) == 1
    await b.announce(node("n"), {d1: frozenset()})            # empty holding drops the digest
    assert await b.peers(d1) == []


async def test_nodes_expire_and_leave(make_backend):
    b = await make_backend()
    d = dg("live")
    await b.register(d, 2 * SEG)
    await b.announce(node("gone"), {d: ALL})
    await b.announce(node("stays"), {d: ALL})
    await b.claim(d, "stays", count=2)
    assert (await b.stats()).nodes == 2
    assert await b.leave("stays") is True and await b.leave("stays") is False
    assert [p.node_id for p in await b.peers(d)] == ["gone"]
    assert (await b.claim(d, "other", count=2)).granted == [0, 1]   # leave released its leases
    await asyncio.sleep(b.timeouts.announce + 0.15)
    assert await b.peers(d) == []
    assert (await b.announce(node("gone"), {})).resync             # it expired: resend holdings
    await b.sweep()
    stats = await b.stats()
    assert stats.nodes == 1 and stats.blobs == 1


async def test_publish_adds_publisher_to_holders(make_backend):
    b = await make_backend()
    d = dg("holder")
    await b.register(d, 2 * SEG)
    await b.announce(node("pub"), {})
    await b.publish(d, 0, "pub", META[0])
    [p] = await b.peers(d, "someone")
    assert (p.node_id, p.complete, p.segments) == ("pub", False, (0,))
    await b.publish(d, 1, "pub", META[1])
    assert (await b.peers(d, "someone"))[0].complete


async def test_wait_wakes_on_publish_from_other_tracker(make_backend):
    a = await make_backend()
    b = await make_backend(shared_with=a)
    d = dg("wait")
    await a.register(d, 2 * SEG)
    assert (await b.wait(d, -1, 5)).version == 0              # already newer: at once
    waiter = asyncio.create_task(b.wait(d, 0, 5))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await a.publish(d, 0, "n", META[0])
    rec = await asyncio.wait_for(waiter, 2)
    assert rec.version == 1 and 0 in rec.segments and loop.time() - start < 1
    many = [asyncio.create_task(b.wait(d, 1, 5)) for _ in range(20)]
    await asyncio.sleep(0.05)
    await a.withdraw(d, 0)
    assert {r.version for r in await asyncio.gather(*many)} == {2}


async def test_wait_timeout_and_unknown(make_backend):
    b = await make_backend()
    d = dg("timeout")
    await b.register(d, SEG)
    loop = asyncio.get_running_loop()
    start = loop.time()
    rec = await b.wait(d, 0, 0.3)
    assert rec.version == 0 and 0.25 < loop.time() - start < 1.5
    with pytest.raises(BlobUnknown):
        await b.wait(dg("unknown"), 0, 0.1)


async def test_concurrent_claims_grant_each_segment_once(make_backend):
    a = await make_backend()
    b = await make_backend(shared_with=a)
    d = dg("race")
    await a.register(d, 8 * SEG)
    grants = await asyncio.gather(*((a if i % 2 else b).claim(d, f"n{i}") for i in range(8)))
    segments = [s for g in grants for s in g.granted]
    assert sorted(segments) == list(range(8))


async def test_blob_records_expire(make_backend):
    b = await make_backend(Timeouts(lease=1, announce=1, blob=0.3))
    d = dg("forget")
    await b.register(d, SEG)
    assert (await b.stats()).blobs == 1
    await asyncio.sleep(0.45)
    assert await b.get_blob(d) is None
    await b.sweep()
    assert (await b.stats()).blobs == 0
