"""A segment's first piece released block by block: the block hashes its
publisher puts in the metainfo, their check, and the readable prefix."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fleetp2p.fetch.download import Download
from fleetp2p.fetch.head import HeadBlocks
from fleetp2p.oci.reference import Digest
from fleetp2p.store import Geometry
from fleetp2p.swarm.metainfo import (HEAD_BLOCK, PieceHasher, check_metainfo, head_hashes,
                                     make_metainfo, piece_hash, torrent_info)

PIECE = 4 * HEAD_BLOCK


def blocks_of(data: bytes) -> list[bytes]:
    return [hashlib.sha256(data[i:i + HEAD_BLOCK]).digest()
            for i in range(0, len(data), HEAD_BLOCK)]


def metainfo_of(data: bytes, piece: int = PIECE) -> bytes:
    hasher = PieceHasher(piece)
    for i in range(0, len(data), 5000):  # fed in chunks that straddle blocks and pieces
        hasher.update(data[i:i + 5000])
    pieces = hasher.finish()
    return make_metainfo(0, len(data), piece, pieces, hasher.head)


def test_the_metainfo_carries_the_first_pieces_block_hashes_and_stays_a_torrent() -> None:
    data = os.urandom(3 * PIECE + 100)
    metainfo = metainfo_of(data)
    assert head_hashes(metainfo) == blocks_of(data[:PIECE])
    check_metainfo(metainfo, 0, len(data), PIECE)
    assert torrent_info(metainfo).num_pieces() == 4
    assert piece_hash(metainfo, 3) == hashlib.sha1(data[3 * PIECE:]).digest()


def test_a_short_segment_hashes_its_last_block_short() -> None:
    data = os.urandom(HEAD_BLOCK + 10)
    assert head_hashes(metainfo_of(data)) == blocks_of(data)


def test_metainfo_without_usable_block_hashes_gives_none() -> None:
    data = os.urandom(PIECE)
    hasher = PieceHasher(PIECE)
    hasher.update(data)
    pieces = hasher.finish()
    assert head_hashes(make_metainfo(0, len(data), PIECE, pieces)) == []  # an older publisher
    assert head_hashes(make_metainfo(0, len(data), PIECE, pieces, hasher.head[:3])) == []
    assert head_hashes(b"not bencoded") == []


async def test_blocks_are_checked_as_they_arrive_from_whichever_answer_is_ahead() -> None:
    data = os.urandom(PIECE)
    shown: list[bytes] = []
    head = HeadBlocks(blocks_of(data), PIECE, shown.append)
    assert head.feed(data[:HEAD_BLOCK - 1]) and shown == []             # no whole block yet
    assert head.feed(data[:HEAD_BLOCK + 5]) and shown == [data[:HEAD_BLOCK]]
    assert head.feed(bytearray(data[:3 * HEAD_BLOCK]))                  # a hedge that is ahead
    assert shown[-1] == data[:3 * HEAD_BLOCK]
    bad = bytearray(data)
    bad[-1] ^= 1
    assert not head.feed(bad), "a block that fails its hash drops the answer"
    assert len(shown) == 2
    assert head.feed(data) and shown[-1] == data


def test_checked_bytes_are_readable_from_memory_after_the_pieces_before_them(tmp_path: Path) -> None:
    download = Download(Digest.parse("sha256:" + "0" * 64), tmp_path)
    download.set_geometry(Geometry(size=10 * PIECE, segment_size=4 * PIECE, piece_size=PIECE))
    data = os.urandom(2 * HEAD_BLOCK)
    download.mark_head(4, data[:HEAD_BLOCK])  # the first piece of segment 1, before segment 0 is in
    assert download.readable() == 0
    download.mark_head(0, data)
    assert download.readable() == 2 * HEAD_BLOCK
    assert download.on_disk(HEAD_BLOCK, HEAD_BLOCK) == (0, data[HEAD_BLOCK:])
    download.mark_head(0, data[:HEAD_BLOCK])  # an older, shorter report does not move it back
    assert download.readable() == 2 * HEAD_BLOCK
    assert download.written == 0, "not on disk: the whole-blob hasher does not read it"
    assert not download.covers(0, HEAD_BLOCK), "a partial piece is not served to peers"

    download.mark_pieces(0, 4)  # on disk now, and segment 1's head follows
    assert download.readable() == 4 * PIECE + HEAD_BLOCK
    assert download.on_disk(0, 4 * PIECE) == (4 * PIECE, b"")
    assert download.on_disk(3 * PIECE, PIECE + 3) == (PIECE, data[:3]), "disk, then memory"
    download.mark_pieces(4, 5)
    assert download.readable() == 5 * PIECE
    assert download.on_disk(4 * PIECE, PIECE) == (PIECE, b"")
    download.mark_head(4, data)  # the piece is whole already
    assert download.readable() == 5 * PIECE


def test_the_last_byte_waits_for_verification_even_from_memory(tmp_path: Path) -> None:
    download = Download(Digest.parse("sha256:" + "0" * 64), tmp_path)
    download.set_geometry(Geometry(size=HEAD_BLOCK, segment_size=PIECE, piece_size=PIECE))
    download.mark_head(0, os.urandom(HEAD_BLOCK))
    assert download.readable() == HEAD_BLOCK - 1
