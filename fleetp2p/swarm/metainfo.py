"""Segment metainfo built by hand while a segment streams in from upstream.

A torrent's info dict is just the name, the length, the piece length and the
concatenated SHA-1 of every piece; hashing as bytes arrive means the segment
can be published the moment its last byte is written.
"""

from __future__ import annotations

import hashlib

import libtorrent as lt


def make_metainfo(index: int, length: int, piece_size: int, piece_hashes: list[bytes]) -> bytes:
    """Bencoded info dict of a single-file torrent named after the segment index,
    so libtorrent reads and writes `<blob dir>/<index>`, the store's segment file."""
    info = {b"name": str(index).encode(), b"length": length, b"piece length": piece_size,
            b"pieces": b"".join(piece_hashes)}
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


class PieceHasher:
    """SHA-1 of each piece of one segment, fed in order. Not thread-safe; feed it
    from the one worker thread that writes the segment."""

    def __init__(self, piece_size: int) -> None:
        self.piece_size = piece_size
        self.hashes: list[bytes] = []
        self._current = hashlib.sha1()
        self._filled = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
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

    def finish(self) -> list[bytes]:
        if self._filled or not self.hashes:
            self.hashes.append(self._current.digest())
            self._filled = 0
        return self.hashes
