"""Agents in one process sharing blobs through a real tracker and real
libtorrent swarms on loopback (multi-host tests in namespaces are in
test_fleet.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import subprocess
import time

import aiohttp
import pytest

from fleetp2p.fetch import blobs
from fleetp2p.fetch.cooperative import LEASE_GRACE, refusal_wait
from fleetp2p.oci.reference import Digest
from fleetp2p.swarm import SegmentFinished, TorrentFailed
from tests.inprocess import FakeUpstream, agent_for, running, wait_stored
from tracker.backend import Timeouts
from tracker.client import TrackerClient
from tracker.memory import MemoryBackend
from tracker.models import LeaseGrant
from tracker.server import create_app

SIZE = 5 * 1024 * 1024 + 4321


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def swarm_settings(tracker: str, **extra) -> dict:
    return {"tracker": tracker, "peer_listen": "127.0.0.1:0", "segment_size": "1MiB",
            "piece_size": "64KiB", "swarm_min_size": "16KiB", "peer_stall_timeout": 3.0, **extra}


async def pull(server, digest: str) -> bytes:
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url(f"/v2/app/blobs/{digest}")) as resp:
            assert resp.status == 200
            return await resp.read()


def upstream_with_blob(size: int = SIZE) -> tuple[FakeUpstream, bytes, str]:
    upstream = FakeUpstream()
    data = os.urandom(size)
    return upstream, data, upstream.add_blob(data)


def value(agent, metric, *labels) -> float:
    return metric.labels(*labels)._value.get() if labels else metric._value.get()


@contextlib.asynccontextmanager
async def fleet(up, tmp_path, n: int):
    port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(agent_for(
            up, tmp_path / "a0", **swarm_settings("embedded", tracker_listen=f"127.0.0.1:{port}")))
        agents = [first]
        for i in range(1, n):
            agents.append(await stack.enter_async_context(agent_for(
                up, tmp_path / f"a{i}", **swarm_settings(f"http://127.0.0.1:{port}"))))
        yield agents


async def test_second_node_gets_blob_from_first(tmp_path):
    upstream, data, digest = upstream_with_blob()
    async with running(upstream.app()) as up, fleet(up, tmp_path, 2) as agents:
        (a, front_a), (b, front_b) = agents
        assert await pull(front_a, digest) == data
        assert upstream.blob_bytes_sent == SIZE
        assert value(a, a.metrics.segments, "upstream") == 6
        assert await pull(front_b, digest) == data
        assert upstream.blob_bytes_sent == SIZE  # nothing more from upstream
        assert value(b, b.metrics.segments, "peer") == 6
        assert value(b, b.metrics.served_bytes, "peer") == SIZE
        await wait_stored(b)
        entry = b.store.get(b.store.entries()[0].digest)
        assert hashlib.sha256(entry.reader().read(0, SIZE)).hexdigest() == digest.split(":")[1]


async def test_the_first_piece_is_readable_before_libtorrent_is_handed_it(tmp_path):
    """The piece a client waits for, read over HTTP from a holder and checked
    against its published hash, is written and readable before libtorrent gets
    it: the client does not wait for libtorrent's disk thread and alert."""
    upstream, data, digest = upstream_with_blob()
    async with running(upstream.app()) as up, fleet(up, tmp_path, 2) as agents:
        (_, front_a), (b, front_b) = agents
        assert await pull(front_a, digest) == data
        handed: list[tuple[int, int, bool]] = []  # (segment, piece, readable when handed)
        add_piece = b.swarm.add_piece

        def recording(key, piece: int, piece_data: bytes) -> None:
            download = b.blobs.download(Digest.parse(digest))
            assert download is not None
            first = key[1] * download.geometry.segment_size // download.geometry.piece_size
            handed.append((key[1], piece, download.has_piece(first + piece)))
            add_piece(key, piece, piece_data)
        b.swarm.add_piece = recording
        assert await pull(front_b, digest) == data
        assert (0, 0, True) in handed, handed[:3]


async def test_the_whole_blob_hash_buffer_is_made_off_the_event_loop(tmp_path, monkeypatch):
    """Zeroing its 8 MiB on the loop stalled every agent of a herd for 5-6 ms
    while its clients waited for their first byte."""
    on_loop: list[bool] = []
    made = blobs.chunk_buffer

    def recording(size: int) -> memoryview:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return made(size)
    monkeypatch.setattr(blobs, "chunk_buffer", recording)
    upstream, data, digest = upstream_with_blob()
    async with running(upstream.app()) as up, fleet(up, tmp_path, 1) as [(_, front)]:
        assert await pull(front, digest) == data
    assert on_loop == [False]


async def test_cold_herd_costs_one_upstream_copy(tmp_path):
    upstream, data, digest = upstream_with_blob()
    async with running(upstream.app()) as up, fleet(up, tmp_path, 4) as agents:
        bodies = await asyncio.gather(*(pull(front, digest) for _, front in agents))
        assert all(body == data for body in bodies)
        assert upstream.blob_bytes_sent <= 1.05 * SIZE
        from_peers = sum(value(a, a.metrics.segments, "peer") for a, _ in agents)
        assert from_peers >= 6  # segments each fetched once upstream, the rest from peers


async def test_embedded_tracker_takes_its_lease_limit_from_the_config(tmp_path):
    port = free_port()
    settings = swarm_settings("embedded", tracker_listen=f"127.0.0.1:{port}", tracker_lease_limit=2)
    digest = "sha256:" + "5a" * 32
    async with running(FakeUpstream().app()) as up, agent_for(up, tmp_path / "a", **settings):
        client = TrackerClient(f"http://127.0.0.1:{port}")
        try:
            await client.register(digest, 8 * 1024 * 1024, segment_size=1024 * 1024)
            grants = [await client.claim(digest, node) for node in ("n1", "n2", "n3")]
        finally:
            await client.close()
    assert [len(g.granted) for g in grants] == [1, 1, 0]


async def test_a_dead_holders_lease_is_taken_over_when_it_ends_not_claimed_on_every_tick(tmp_path):
    """Another node holds the only lease (TTL 6 s) and has died: the refused
    agent asks the tracker again when the tracker said that lease ends, not on
    every tick of its loop (0.5 s) nor every third of the TTL, and takes it then."""
    ttl = 6.0
    upstream, data, digest = upstream_with_blob(1024 * 1024)  # one segment
    tracker = create_app(MemoryBackend(Timeouts(lease=ttl)), None)
    async with running(tracker) as tracker_server, running(upstream.app()) as up:
        url = f"http://127.0.0.1:{tracker_server.port}"
        async with agent_for(up, tmp_path / "a", **swarm_settings(url)) as (agent, front):
            client = TrackerClient(url)
            try:
                await client.register(digest, len(data), segment_size=1024 * 1024,
                                      piece_size=64 * 1024)
                assert (await client.claim(digest, "gone")).granted == [0]  # never renewed
                lapses_at = time.monotonic() + ttl
            finally:
                await client.close()
            assert await pull(front, digest) == data
            late = time.monotonic() - lapses_at
            claims = agent.metrics.registry.get_sample_value(
                "fleetp2p_tracker_request_seconds_count", {"op": "claim"})
    assert 0 < late < 1.5, f"served {late:.1f} s after the lease lapsed"  # a TTL/3 wait: up to 2.5
    assert claims <= 3, f"{claims} claims"  # refused, then taken (a third of the TTL: 4, a tick: 12)
    assert value(agent, agent.metrics.segments, "upstream") == 1


def test_a_refused_claimer_waits_for_the_end_the_tracker_gave_within_one_ttl():
    def wait(expires_in: float | None) -> float:
        return refusal_wait(LeaseGrant("sha256:" + "0" * 64, [], 15.0, 1, holders={0: "n"},
                                       expires_in=expires_in))
    assert wait(None) == 5.0                               # an older tracker: a third of the TTL
    assert wait(9.5) == pytest.approx(9.5 + LEASE_GRACE)
    assert wait(-3.0) == pytest.approx(LEASE_GRACE)          # nonsense is held to [0, TTL]
    assert wait(600.0) == pytest.approx(15.0 + LEASE_GRACE)


async def test_tracker_down_goes_straight_to_upstream(tmp_path):
    upstream, data, digest = upstream_with_blob()
    dead = f"http://127.0.0.1:{free_port()}"
    async with running(upstream.app()) as up, \
            agent_for(up, tmp_path / "x", **swarm_settings(dead)) as (agent, front):
        assert await pull(front, digest) == data
        assert value(agent, agent.metrics.served_bytes, "upstream") == SIZE


async def test_bad_fleet_copy_is_withdrawn_and_refetched(tmp_path):
    """Upstream corrupts one segment: its metainfo is published, the whole-blob
    digest then fails, the metainfo is withdrawn and the blob refetched whole."""
    upstream, data, digest = upstream_with_blob()
    upstream.faults = ["corrupt"]
    async with running(upstream.app()) as up, fleet(up, tmp_path, 1) as agents:
        (agent, front), = agents
        async with aiohttp.ClientSession() as session:
            async with session.get(front.make_url(f"/v2/app/blobs/{digest}")) as resp:
                assert resp.status == 200
                try:
                    body = await resp.read()
                except aiohttp.ClientPayloadError:
                    body = None
        assert body is None or body == data  # never a complete wrong body
        await wait_stored(agent)  # the refetch runs in the background
        assert await pull(front, digest) == data
        assert value(agent, agent.metrics.verification_failures, "blob") == 1
        record = await agent.tracker.get_blob(digest)
        assert record is not None and not record.segments  # bad metainfo withdrawn


async def test_unreadable_metainfo_at_the_tracker_is_withdrawn_and_refetched(tmp_path):
    """A node published bytes that are not a bencoded info dict for segment 0:
    the next node withdraws it and fetches that segment from upstream."""
    upstream, data, digest = upstream_with_blob()
    async with running(upstream.app()) as up, fleet(up, tmp_path, 1) as agents:
        (agent, front), = agents
        await agent.tracker.register(digest, SIZE, segment_size=1024 * 1024, piece_size=64 * 1024)
        await agent.tracker.publish(digest, 0, "someone", b"not bencoded")
        assert await asyncio.wait_for(pull(front, digest), 20) == data
        record = await agent.tracker.get_blob(digest)
        assert record is not None and record.segments[0].metainfo != b"not bencoded"
        assert value(agent, agent.metrics.segments, "upstream") == 6


async def test_a_fresh_segment_holds_uploads_while_its_first_copies_leave(tmp_path):
    """After publishing a segment it fetched from upstream, a node holds its
    BitTorrent uploads back for a while: that segment's to a trickle, the
    others' to a share of the rate it arrived at; then every hold is lifted."""
    upstream, data, digest = upstream_with_blob()
    async with running(upstream.app()) as up, fleet(up, tmp_path, 1) as agents:
        (a, front), = agents
        holds: list[tuple[list, int]] = []
        hold_uploads = a.swarm.hold_uploads

        def recording(keys, rate: int) -> None:
            holds.append((list(keys), rate))
            hold_uploads(keys, rate)
        a.swarm.hold_uploads = recording
        assert await pull(front, digest) == data
        await asyncio.sleep(0.5)  # in-process segments arrive in milliseconds: so do the lifts
        fresh = [keys[0] for keys, rate in holds if rate == 1]
        assert sorted(index for _, index in fresh) == list(range(6))
        assert any(rate > 1 for _, rate in holds)
        lifted = {key for keys, rate in holds if rate == 0 for key in keys}
        assert lifted == {key for keys, rate in holds for key in keys}
        assert all(h.upload_limit() <= 0 for h in a.swarm._handles.values())


async def test_a_file_error_on_a_complete_segment_does_not_fail_the_pull(tmp_path, caplog):
    """libtorrent stops a torrent on any file error, seeding ones too (a read for
    an upload can fail): a segment already complete and verified stays usable."""
    upstream, data, digest = upstream_with_blob()
    async with running(upstream.app()) as up, fleet(up, tmp_path, 2) as agents:
        (_, front_a), (b, front_b) = agents
        assert await pull(front_a, digest) == data
        subscribe = b.swarm.subscribe

        def failing_after_finish(blob: str, listener):
            def relay(event) -> None:
                listener(event)
                if isinstance(event, SegmentFinished) and event.key[1] == 0:
                    listener(TorrentFailed(event.key, "read error (injected)"))
            return subscribe(blob, relay)

        b.swarm.subscribe = failing_after_finish
        assert await asyncio.wait_for(pull(front_b, digest), 20) == data
    assert any("complete but no longer seeded: read error" in r.getMessage()
               for r in caplog.records)


@contextlib.contextmanager
def small_disk(path, size: str):
    """A tmpfs of `size` at `path` (root only): a disk that fills up."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
async def test_a_full_disk_fails_the_pull_instead_of_hanging(tmp_path, caplog):
    """libtorrent stops a segment's torrent when its file cannot be written: the
    client's body is cut within seconds and the agent says why."""
    upstream, data, digest = upstream_with_blob()
    port = free_port()
    async with running(upstream.app()) as up, agent_for(
            up, tmp_path / "a", **swarm_settings("embedded", tracker_listen=f"127.0.0.1:{port}")) \
            as (_, front_a):
        assert await pull(front_a, digest) == data
        with small_disk(tmp_path / "small", "2m") as disk:
            async with agent_for(up, disk / "b", store_max_size="1GiB",
                                 **swarm_settings(f"http://127.0.0.1:{port}")) as (b, front_b):
                with pytest.raises(aiohttp.ClientPayloadError):
                    await asyncio.wait_for(pull(front_b, digest), 15)
    failures = [r.getMessage() for r in caplog.records
                if r.name == "fleetp2p.fetch.blobs" and "failed" in r.getMessage()]
    assert failures and "No space left on device" in failures[0], failures
