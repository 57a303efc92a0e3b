"""An interrupted fleet download keeps what it had: the store keeps the partial
across restarts, libtorrent checks it, and only the missing bytes are fetched."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import aiohttp
import pytest

from fleetp2p.oci.reference import Digest
from fleetp2p.store import BlobStore, Geometry
from fleetp2p.store.partials import RECORD, Record
from tests.inprocess import FakeUpstream, agent_for, running, wait_stored
from tests.test_swarm_fetch import SIZE, free_port, pull, swarm_settings, value

MiB = 1024 * 1024
DIGEST = Digest("sha256", "ab" * 32)
GEOMETRY = Geometry(10 * MiB, MiB, 64 * 1024)


def _partial(store: BlobStore, digest: Digest = DIGEST, written: int = 3 * MiB):
    writer = store.new_partial(digest, GEOMETRY, Record(digest, GEOMETRY))
    writer.pwrite(b"x" * written, 0)
    writer.close()
    return store.path_for(digest)


def test_a_recorded_partial_survives_a_restart_and_a_plain_one_does_not(tmp_path):
    store = BlobStore(tmp_path, limit=100 * MiB)
    store.open()
    kept = _partial(store)
    plain = store.new_partial(Digest("sha256", "cd" * 32), GEOMETRY)
    plain.pwrite(b"y" * MiB, 0)
    plain.close()

    reopened = BlobStore(tmp_path, limit=100 * MiB)
    reopened.open()
    assert kept.exists() and not plain.directory.exists()
    assert 3 * MiB < reopened.partials.bytes <= 3 * MiB + 4096  # segment files and the record
    assert reopened.metrics.store_partial_bytes._value.get() == reopened.partials.bytes
    assert reopened.get(DIGEST) is None  # a partial is never served as a blob

    writer = reopened.new_partial(DIGEST, GEOMETRY, Record(DIGEST, GEOMETRY))
    assert (kept / "0").stat().st_size == MiB and (kept / "2").exists()
    assert reopened.partials.bytes == 0  # in flight now: not GC's to evict
    assert reopened.metrics.store_partial_bytes._value.get() == 0
    writer.close()


def test_a_partial_cut_another_way_is_started_over(tmp_path):
    store = BlobStore(tmp_path, limit=100 * MiB)
    store.open()
    directory = _partial(store)
    reopened = BlobStore(tmp_path, limit=100 * MiB)
    reopened.open()
    other = Geometry(10 * MiB, 2 * MiB, 64 * 1024)
    reopened.new_partial(DIGEST, other, Record(DIGEST, other)).close()
    assert not (directory / "0").exists()
    assert json.loads((directory / RECORD).read_bytes())["segment_size"] == 2 * MiB


def test_a_stream_continues_only_a_stream(tmp_path):
    """A piece-by-piece download leaves holes a stream would take for bytes; a
    fleet fetch checks every piece, so it may take over either kind."""
    store = BlobStore(tmp_path, limit=100 * MiB)
    store.open()
    directory = _partial(store)
    reopened = BlobStore(tmp_path, limit=100 * MiB)
    reopened.open()
    reopened.new_partial(DIGEST, GEOMETRY, Record(DIGEST, GEOMETRY, stream=True)).close()
    assert not (directory / "0").exists()

    streamed = reopened.new_partial(DIGEST, GEOMETRY, Record(DIGEST, GEOMETRY, stream=True))
    streamed.pwrite(b"s" * MiB, 0)
    reopened.keep_partial(streamed, DIGEST)
    reopened.new_partial(DIGEST, GEOMETRY, Record(DIGEST, GEOMETRY)).close()
    assert (directory / "0").stat().st_size == MiB
    assert json.loads((directory / RECORD).read_bytes())["stream"] is False


def test_a_record_naming_another_digest_is_debris(tmp_path):
    store = BlobStore(tmp_path, limit=100 * MiB)
    store.open()
    directory = _partial(store)
    record = json.loads((directory / RECORD).read_bytes())
    (directory / RECORD).write_text(json.dumps({**record, "digest": "sha256:" + "ef" * 32}))
    BlobStore(tmp_path, limit=100 * MiB).open()
    assert not directory.exists()


def test_gc_evicts_partials_before_blobs(tmp_path):
    store = BlobStore(tmp_path, limit=10 * MiB)
    store.open()
    blob = store.put_bytes(Digest("sha256", hashlib.sha256(b"z" * MiB).hexdigest()),
                           b"z" * MiB)
    directory = _partial(store, written=4 * MiB)
    reopened = BlobStore(tmp_path, limit=10 * MiB)
    reopened.open()
    assert reopened.needs_gc(5 * MiB)
    freed = reopened.gc(5 * MiB)
    assert freed > 4 * MiB and not directory.exists()
    assert reopened.get(blob.digest) is not None


def test_a_commit_leaves_no_record(tmp_path):
    store = BlobStore(tmp_path, limit=100 * MiB)
    store.open()
    data = os.urandom(1000)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    geometry = Geometry.for_size(len(data))
    writer = store.new_partial(digest, geometry, Record(digest, geometry))
    writer.pwrite(data, 0)
    store.commit(writer, digest)
    assert not (store.path_for(digest) / RECORD).exists()


async def _wait(predicate, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_a_restarted_agent_fetches_only_what_it_was_missing(tmp_path):
    """An agent with an embedded tracker (which forgets everything when the agent
    stops) is stopped after three of six segments; restarted, it checks them
    against the metainfo it saved, publishes them again, and takes only the
    other three from upstream."""
    upstream = FakeUpstream()
    data = os.urandom(SIZE)
    digest = upstream.add_blob(data)
    upstream.faults = ["slow"] * 20
    settings = swarm_settings("embedded", tracker_listen=f"127.0.0.1:{free_port()}")
    directory = tmp_path / "a" / "blobs" / "sha256" / digest.split(":")[1]
    async with running(upstream.app()) as up:
        async with agent_for(up, tmp_path / "a", **settings) as (agent, front):
            client = asyncio.create_task(pull(front, digest))
            await _wait(lambda: value(agent, agent.metrics.segments, "upstream") >= 3)
            client.cancel()
        first = upstream.blob_bytes_sent
        assert first < SIZE, "the first run finished before it was stopped"
        assert (directory / RECORD).exists() and not (directory / "complete").exists()

        upstream.faults = []
        async with agent_for(up, tmp_path / "a", **settings) as (agent, front):
            assert await pull(front, digest) == data
            await wait_stored(agent)
            resumed = value(agent, agent.metrics.resumed_bytes)
            second = upstream.blob_bytes_sent - first
            local = value(agent, agent.metrics.segments, "local")
            record = await agent.tracker.get_blob(digest)
    print(f"first run {first} bytes, then kept {resumed:.0f} and fetched {second}")
    assert resumed >= 3 * MiB and local >= 3
    assert second == SIZE - resumed
    assert record is not None and len(record.segments) == 6
    assert (directory / "complete").exists() and not (directory / RECORD).exists()


async def _stopped_half_way(up, upstream: FakeUpstream, data_dir, digest: str, **settings) -> int:
    """Start a pull, stop the agent once a third of the blob is on disk; returns
    the bytes upstream had sent by then."""
    upstream.faults = ["slow"] * 20
    async with agent_for(up, data_dir, **settings) as (agent, front):
        client = asyncio.create_task(pull(front, digest))
        await _wait(lambda: value(agent, agent.metrics.upstream_bytes, "blob") >= SIZE // 3)
        client.cancel()
    upstream.faults = []
    return upstream.blob_bytes_sent


async def test_a_stream_from_upstream_continues_where_it_stopped(tmp_path):
    """No tracker: one stream per blob. Stopped, then restarted, the agent hashes
    the bytes on disk again and asks upstream for the rest with Range."""
    upstream = FakeUpstream()
    data = os.urandom(SIZE)
    digest = upstream.add_blob(data)
    async with running(upstream.app()) as up:
        first = await _stopped_half_way(up, upstream, tmp_path / "a", digest)
        async with agent_for(up, tmp_path / "a") as (agent, front):
            assert await pull(front, digest) == data
            resumed = value(agent, agent.metrics.resumed_bytes)
    ranges = [r for method, _, r in upstream.log if method == "GET" and r]
    assert resumed >= SIZE // 3 and upstream.blob_bytes_sent - first == SIZE - resumed
    assert ranges == [f"bytes={resumed:.0f}-"]


async def test_bytes_that_rotted_on_disk_cost_one_failed_pull_then_a_fresh_fetch(tmp_path):
    upstream = FakeUpstream()
    data = os.urandom(SIZE)
    digest = upstream.add_blob(data)
    directory = tmp_path / "a" / "blobs" / "sha256" / digest.split(":")[1]
    async with running(upstream.app()) as up:
        await _stopped_half_way(up, upstream, tmp_path / "a", digest)
        with open(directory / "0", "r+b") as f:
            f.seek(1000)
            f.write(b"rot")
        async with agent_for(up, tmp_path / "a") as (agent, front):
            with pytest.raises(aiohttp.ClientPayloadError):  # cut one byte short: never whole
                await pull(front, digest)
            await wait_stored(agent)  # the fresh fetch runs in the background
            assert await pull(front, digest) == data
            assert value(agent, agent.metrics.verification_failures, "blob") == 1


async def test_a_stream_killed_before_its_commit_needs_no_upstream_bytes(tmp_path):
    upstream = FakeUpstream()
    data = os.urandom(SIZE)
    digest = Digest.parse(upstream.add_blob(data))
    store = BlobStore(tmp_path / "a", limit=100 * MiB)
    store.open()
    geometry = Geometry.for_size(SIZE)
    writer = store.new_partial(digest, geometry, Record(digest, geometry, stream=True))
    writer.pwrite(data, 0)
    store.keep_partial(writer, digest)
    async with running(upstream.app()) as up, agent_for(up, tmp_path / "a") as (agent, front):
        assert await pull(front, str(digest)) == data
        assert value(agent, agent.metrics.resumed_bytes) == SIZE
    assert upstream.blob_bytes_sent == 0
    assert not [method for method, _, _ in upstream.log if method == "GET"]
