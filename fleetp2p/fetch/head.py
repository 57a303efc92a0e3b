"""The first piece of a segment, given to the clients waiting for it block by
block as it arrives from peers, each block checked against the SHA-256 its
publisher put in the metainfo (swarm.metainfo.HEAD_KEY).

On the 16-node fleet bench, fifteen nodes ask the one holder for the same
first piece at once; its uplink sends them a few at a time, and the last
node's whole piece arrived up to 150 ms after its request.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

from fleetp2p.swarm.metainfo import HEAD_BLOCK


class HeadBlocks:
    """The checked prefix of one piece, from whichever answers (a hedged read
    has several at once) bring each next block first."""

    def __init__(self, hashes: list[bytes], length: int) -> None:
        self.hashes = hashes
        self.length = length
        self.data = bytearray()  # the piece's first bytes, every block checked
        self._grew = asyncio.Event()

    def feed(self, received: bytes | bytearray | memoryview) -> bool:
        """`received`: one answer's bytes so far (the first len(received) of the
        piece). False if a block it adds fails its hash: that answer is bad, and
        the caller drops it. A block the prefix already has is not looked at:
        the whole piece is checked against its SHA-1 before it is used."""
        view = memoryview(received)
        grew = False
        while len(self.data) < self.length:
            start = len(self.data)
            end = min(start + HEAD_BLOCK, self.length)
            if len(view) < end:
                break
            block = view[start:end]
            if hashlib.sha256(block).digest() != self.hashes[start // HEAD_BLOCK]:
                return False
            self.data += block
            grew = True
        if grew:
            self._grew.set()
        return True

    async def flush(self, write: Callable[[bytes, int], Awaitable[bool]],
                    readable: Callable[[int], None]) -> None:
        """Until cancelled: each new stretch of checked blocks written (`write(data,
        offset in the piece)`, False if it could not be), then made readable
        (`readable(bytes on disk)`). One write at a time, of all that arrived
        meanwhile: a thread hop per block would cost more than the blocks."""
        on_disk = 0
        while on_disk < self.length:
            await self._grew.wait()
            self._grew.clear()
            data = bytes(self.data[on_disk:])
            if not data:
                continue
            if not await write(data, on_disk):
                return
            on_disk += len(data)
            readable(on_disk)
