"""Segment metainfo built by hand while a segment streams in from upstream.

A torrent's info dict is just the name, the length, the piece length and the
concatenated SHA-1 of every piece; hashing as bytes arrive means the segment
can be published the moment its last byte is written.

One key of our own rides along: `fleetp2p head`, the SHA-256 of each 16 KiB
block of the segment's first piece. A client blocked on that piece can then be
sent each block as it arrives from a peer, checked, instead of waiting for the
whole piece (at a holder whose uplink fifteen nodes share, a whole piece comes
eight times later than its first block). libtorrent ignores keys it does not
know; the info hash covers this one like the rest.
"""

from __future__ import annotations

import hashlib

import libtorrent as lt


HEAD_BLOCK = 16 * 1024  # BitTorrent's block size: what a peer sends at once anyway
HEAD_KEY = b"fleetp2p head"


def make_metainfo(index: int, length: int, piece_size: int, piece_hashes: list[bytes],
                  head: list[bytes] | None = None) -> bytes:
    """Bencoded info dict of a single-file torrent named after the segment index,
    so libtorrent reads and writes `<blob dir>/<index>`, the store's segment file.
    `head`: the SHA-256 of each HEAD_BLOCK of the first piece (PieceHasher.head)."""
    info = {b"name": str(index).encode(), b"length": length, b"piece length": piece_size,
            b"pieces": b"".join(piece_hashes)}
    if head:
        info[HEAD_KEY] = b"".join(head)
    return lt.bencode(info)


def torrent_info(metainfo: bytes) -> "lt.torrent_info":
    return lt.torrent_info(lt.bdecode(lt.bencode({b"info": lt.bdecode(metainfo)})))


def check_metainfo(metainfo: bytes, index: int, length: int, piece_size: int) -> None:
    """Reject (ValueError) metainfo that is not a bencoded info dict, or whose
    geometry does not match the blob record."""
    try:
        info = lt.bdecode(metainfo)
    except RuntimeError as e:  # the binding's bdecode error
        raise ValueError(f"metainfo is not bencoded: {e}") from None
    if not isinstance(info, dict):
        raise ValueError("metainfo is not a bencoded dict")
    if info.get(b"name") != str(index).encode() or info.get(b"length") != length or \
            info.get(b"piece length") != piece_size:
        raise ValueError(f"metainfo does not describe segment {index} ({length} bytes, "
                         f"{piece_size}-byte pieces)")
    pieces = info.get(b"pieces", b"")
    if len(pieces) != 20 * max(1, -(-length // piece_size)):
        raise ValueError("metainfo piece count does not match the segment length")


def piece_hash(metainfo: bytes, piece: int) -> bytes | None:
    """The published SHA-1 of one piece of a segment (None if unreadable)."""
    try:
        info = lt.bdecode(metainfo)
    except RuntimeError:
        return None
    pieces = info.get(b"pieces", b"") if isinstance(info, dict) else b""
    digest = pieces[20 * piece:20 * piece + 20]
    return digest if len(digest) == 20 else None


def head_hashes(metainfo: bytes) -> list[bytes]:
    """The SHA-256 of each block of the segment's first piece, if the publisher
    sent them (older agents did not) and they match the first piece's length;
    else []: that piece is then only checked whole."""
    try:
        info = lt.bdecode(metainfo)
    except RuntimeError:
        return []
    if not isinstance(info, dict):
        return []
    joined, length, piece = info.get(HEAD_KEY), info.get(b"length"), info.get(b"piece length")
    if not isinstance(joined, bytes) or not isinstance(length, int) or \
            not isinstance(piece, int) or piece <= 0:
        return []
    if len(joined) != 32 * -(-min(length, piece) // HEAD_BLOCK):
        return []
    return [joined[i:i + 32] for i in range(0, len(joined), 32)]


class PieceHasher:
    """SHA-1 of each piece of one segment, fed in order. Not thread-safe; feed it
    from the one worker thread that writes the segment."""

    def __init__(self, piece_size: int) -> None:
        self.piece_size = piece_size
        self.hashes: list[bytes] = []
        self.head: list[bytes] = []  # see HEAD_KEY
        self._current = hashlib.sha1()
        self._filled = 0
        self._block = hashlib.sha256()
        self._block_filled = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if not self.hashes:
            self._hash_head(view[:self.piece_size - self._filled])
        while view:
            room = self.piece_size - self._filled
            part = view[:room]
            self._current.update(part)
            self._filled += len(part)
            view = view[len(part):]
            if self._filled == self.piece_size:
                self.hashes.append(self._current.digest())
                self._current = hashlib.sha1()
                self._filled = 0

    def _hash_head(self, view: memoryview) -> None:
        while view:
            part = view[:HEAD_BLOCK - self._block_filled]
            self._block.update(part)
            self._block_filled += len(part)
            view = view[len(part):]
            if self._block_filled == HEAD_BLOCK:
                self.head.append(self._block.digest())
                self._block = hashlib.sha256()
                self._block_filled = 0

    def finish(self) -> list[bytes]:
        if self._block_filled:  # a first piece shorter than a whole number of blocks
            self.head.append(self._block.digest())
            self._block_filled = 0
        if self._filled or not self.hashes:
            self.hashes.append(self._current.digest())
            self._filled = 0
        return self.hashes
