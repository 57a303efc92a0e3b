"""A download's in-order prefix, as its readers and its hasher wait on it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fleetp2p.fetch.download import Download
from fleetp2p.oci.reference import Digest
from fleetp2p.store import Geometry

PIECE = 16 * 1024
DIGEST = Digest.parse("sha256:" + "0" * 64)


async def test_wait_written_wakes_once_enough_is_on_disk_or_all_of_it(tmp_path: Path) -> None:
    """The whole-blob hasher waits for a batch, not for every piece, yet never
    for bytes that will not come."""
    download = Download(DIGEST, tmp_path)
    download.set_geometry(Geometry(size=10 * PIECE, segment_size=4 * PIECE, piece_size=PIECE))
    waiter = asyncio.create_task(download.wait_written(0, 4 * PIECE))
    for piece in range(3):
        download.mark_pieces(piece, piece + 1)
        await asyncio.sleep(0)
        assert not waiter.done(), f"woke after {piece + 1} pieces, before the batch"
    download.mark_pieces(5, 6)  # out of order: the prefix does not move
    await asyncio.sleep(0)
    assert not waiter.done()
    download.mark_pieces(3, 5)
    assert await asyncio.wait_for(waiter, 1) == 6 * PIECE

    tail = asyncio.create_task(download.wait_written(6 * PIECE, 8 * PIECE))
    download.mark_pieces(6, 10)
    assert await asyncio.wait_for(tail, 1) == 10 * PIECE, "the end of the blob ends the wait"
