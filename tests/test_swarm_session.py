"""The libtorrent session wrapper on loopback: hand-built metainfo, seeding from
the store's segment files, piece events only once bytes are readable, and
pieces injected from elsewhere."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from fleetp2p.metrics import Metrics
from fleetp2p.swarm import HashFailed, PieceFinished, PieceHasher, SegmentFinished, Swarm, make_metainfo

PIECE = 64 * 1024


@pytest.fixture
async def two_swarms():
    a, b = Swarm("127.0.0.1:0", Metrics()), Swarm("127.0.0.1:0", Metrics())
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def segment_with_metainfo(directory, index: int, data: bytes) -> bytes:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / str(index)).write_bytes(data)
    hasher = PieceHasher(PIECE)
    hasher.update(data)
    return make_metainfo(index, len(data), PIECE, hasher.finish())


async def test_seed_to_leecher_pieces_readable_on_event(tmp_path, two_swarms):
    seeder, leecher = two_swarms
    data = os.urandom(40 * PIECE + 123)
    metainfo = segment_with_metainfo(tmp_path / "a", 3, data)
    key = ("sha256:x", 3)
    seeder.add_segment(key, metainfo, tmp_path / "a", seed=True)
    (tmp_path / "b").mkdir()
    finished = asyncio.Event()
    mismatches = []
    pieces = set()

    def on_event(event):
        if isinstance(event, PieceFinished):
            pieces.add(event.piece)
            start = event.piece * PIECE
            expected = data[start:start + PIECE]
            with open(tmp_path / "b" / "3", "rb") as f:
                f.seek(start)
                if f.read(len(expected)) != expected:
                    mismatches.append(event.piece)
        elif isinstance(event, SegmentFinished):
            finished.set()

    leecher.subscribe("sha256:x", on_event)
    leecher.add_segment(key, metainfo, tmp_path / "b", seed=False)
    leecher.connect(key, [("127.0.0.1", seeder.port)])
    await asyncio.wait_for(finished.wait(), 20)
    assert (tmp_path / "b" / "3").read_bytes() == data
    assert pieces == set(range(41))
    assert mismatches == []  # posix disk I/O: a finished piece is in the file
    assert await leecher.read_piece(key, 40) == data[40 * PIECE:]


async def test_add_piece_injects_and_bad_piece_is_rejected(tmp_path, two_swarms):
    swarm, _ = two_swarms
    data = os.urandom(4 * PIECE)
    metainfo = segment_with_metainfo(tmp_path / "src", 0, data)
    (tmp_path / "dst").mkdir()
    key = ("sha256:y", 0)
    done = asyncio.Event()
    failed = asyncio.Event()

    def on_event(event):
        if isinstance(event, SegmentFinished):
            done.set()
        elif isinstance(event, HashFailed):
            failed.set()

    swarm.subscribe("sha256:y", on_event)
    swarm.add_segment(key, metainfo, tmp_path / "dst", seed=False)
    swarm.add_piece(key, 1, b"\0" * PIECE)  # wrong bytes: libtorrent drops them
    await asyncio.wait_for(failed.wait(), 10)
    for piece in range(4):
        swarm.add_piece(key, piece, data[piece * PIECE:(piece + 1) * PIECE])
    await asyncio.wait_for(done.wait(), 10)
    assert (tmp_path / "dst" / "0").read_bytes() == data
    assert hashlib.sha256((tmp_path / "dst" / "0").read_bytes()).digest() == hashlib.sha256(data).digest()


async def test_pieces_given_while_libtorrent_checks_the_file_are_kept(tmp_path, two_swarms):
    """A new torrent first checks its file (here half of it, left by an earlier
    attempt); libtorrent drops add_piece meanwhile, so the swarm holds the
    pieces until the check is over."""
    swarm, _ = two_swarms
    pieces = 256
    data = os.urandom(pieces * PIECE)
    metainfo = segment_with_metainfo(tmp_path / "src", 0, data)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "0").write_bytes(data[:pieces // 2 * PIECE])
    key = ("sha256:z", 0)
    done = asyncio.Event()
    swarm.subscribe("sha256:z", lambda e: done.set() if isinstance(e, SegmentFinished) else None)
    swarm.add_segment(key, metainfo, tmp_path / "dst", seed=False)
    for piece in range(pieces // 2, pieces):
        swarm.add_piece(key, piece, data[piece * PIECE:(piece + 1) * PIECE])
    await asyncio.wait_for(done.wait(), 10)
    assert (tmp_path / "dst" / "0").read_bytes() == data


async def test_a_closed_swarm_ignores_holds_and_limits_due_later(tmp_path):
    """A hold lifted by a timer after the agent closed its swarm (shutdown
    right after a publish) raised "invalid torrent handle" in that callback."""
    swarm = Swarm("127.0.0.1:0", Metrics())
    await swarm.start()
    data = os.urandom(3 * PIECE)
    key = ("sha256:y", 0)
    swarm.add_segment(key, segment_with_metainfo(tmp_path, 0, data), tmp_path, seed=True)
    swarm.hold_uploads([key], 1)
    await swarm.close()
    swarm.hold_uploads([key], 0)
    swarm.limit("sha256:y", 0)
    swarm.disconnect(key)
    assert swarm.peer_count(key) == 0
