"""Geometry, validation and wire round-trips: no servers needed."""

from __future__ import annotations

import pytest

from tracker.errors import BadRequest
from tracker.models import (MAX_SEGMENTS, AnnounceReply, BlobRecord, LeaseGrant, MiB, Node, Peer,
                            SegmentMeta, check_digest, check_holding, check_node_id,
                            check_segments, choose_geometry)

GiB = 1024 * MiB


@pytest.mark.parametrize("size, seg, piece", [
    (0, 32 * MiB, MiB // 8),
    (1, 32 * MiB, MiB // 8),
    (256 * 32 * MiB, 32 * MiB, MiB // 8),     # exactly 256 segments: no growth
    (256 * 32 * MiB + 1, 64 * MiB, MiB // 8),
    (10 * 1024 * GiB, 64 * GiB, 4 * MiB),     # 10 TiB: pieces grow too, metainfo stays small
])
def test_default_geometry(size, seg, piece):
    assert choose_geometry(size) == (seg, piece)
    assert -(-size // seg) <= MAX_SEGMENTS


def test_proposed_geometry():
    assert choose_geometry(100 * MiB, 16 * MiB, 4 * MiB) == (16 * MiB, 4 * MiB)
    assert choose_geometry(100 * MiB, 1 * MiB, 4 * MiB) == (1 * MiB, 1 * MiB)   # piece <= segment
    assert choose_geometry(1024 * MiB, 1 * MiB)[0] == 4 * MiB                  # grown to 256 segs
    for bad in ((100, 3 * MiB, None), (100, None, 1000), (-1, None, None), (2 ** 50, None, None),
                (100, None, 128 * MiB), (True, None, None)):
        with pytest.raises(BadRequest):
            choose_geometry(*bad)


def test_validation():
    assert check_digest("sha256:" + "a" * 64)
    for bad in ("sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha512:" + "a" * 64, None, 5):
        with pytest.raises(BadRequest):
            check_digest(bad)
    assert check_node_id("node-1.example:6881")
    for bad in ("", "a b", "x" * 129, "-lead", None):
        with pytest.raises(BadRequest):
            check_node_id(bad)
    assert check_segments([3, 1, 3]) == [3, 1]
    with pytest.raises(BadRequest):
        check_segments([0, 4], count=4)
    with pytest.raises(BadRequest):
        check_segments("012")
    assert check_holding("all", "h") == "all" and check_holding([2, 2], "h") == frozenset({2})
    with pytest.raises(BadRequest):
        Node.from_wire({"node": "n", "host": "h", "port": 0})
    with pytest.raises(BadRequest):
        Node.from_wire({"node": "n", "host": "h", "port": 1, "http": "ftp://x"})
    with pytest.raises(BadRequest):
        Node.from_wire({"node": "n", "host": "h", "port": 1, "labels": {"zone": 1}})


def test_wire_round_trips():
    rec = BlobRecord("sha256:" + "b" * 64, 130 * MiB, 64 * MiB, MiB, 3,
                     {1: SegmentMeta(1, b"d4:infoe", "n", "ab" * 20)})
    assert BlobRecord.from_wire(rec.to_wire()) == rec
    assert rec.missing() == [0, 2] and not rec.complete and rec.segment_span(2) == (128 * MiB, 130 * MiB)
    grant = LeaseGrant(rec.digest, [0], 15.0, 3, [], [0], {2: "other"})
    assert LeaseGrant.from_wire(grant.to_wire()) == grant
    timed = LeaseGrant(rec.digest, [], 15.0, 3, holders={2: "other"}, expires_in=4.25)
    assert LeaseGrant.from_wire(timed.to_wire()) == timed
    peer = Peer("n", "10.0.0.2", 6881, None, {"zone": "a"}, False, (0, 2))
    assert Peer.from_wire(peer.to_wire()) == peer and peer.has(2) and not peer.has(1)
    assert AnnounceReply.from_wire(AnnounceReply(30, 15, True).to_wire()).resync
