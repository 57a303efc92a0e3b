"""The first piece of a segment, given to the clients waiting for it block by
block as it arrives from peers, each block checked against the SHA-256 its
publisher put in the metainfo (swarm.metainfo.HEAD_KEY). The blocks are sent
from memory (Download.mark_head): the piece goes to disk once it is whole,
and a thread hop per write had cost 15-75 ms before the client's first byte.

On the 16-node fleet bench, fifteen nodes ask the one holder for the same
first piece at once; its uplink sends them a few at a time, and the last
node's whole piece arrived up to 150 ms after its request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from fleetp2p.swarm.metainfo import HEAD_BLOCK


class HeadBlocks:
    """The checked prefix of one piece, from whichever answers (a hedged read
    has several at once) bring each next block first."""

    def __init__(self, hashes: list[bytes], length: int, checked: Callable[[bytes], None]) -> None:
        self.hashes = hashes
        self.length = length
        self.data = bytearray()  # the piece's first bytes, every block checked
        self._checked = checked  # shown a copy of `data` each time it grows

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
            self._checked(bytes(self.data))
        return True
