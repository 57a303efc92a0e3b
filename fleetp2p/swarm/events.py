"""libtorrent alerts as named events: the only things the rest of the agent hears from the swarm.

Alert objects die at the next `pop_alerts()`, so each event copies what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

SegmentKey = tuple[str, int]  # (blob digest, segment index)


@dataclass(frozen=True)
class PieceFinished:
    key: SegmentKey
    piece: int


@dataclass(frozen=True)
class SegmentFinished:
    key: SegmentKey


@dataclass(frozen=True)
class SegmentChecked:
    """libtorrent has checked the segment's file: the pieces it found on disk
    were reported (PieceFinished) before this."""

    key: SegmentKey


@dataclass(frozen=True)
class HashFailed:
    key: SegmentKey
    piece: int


@dataclass(frozen=True)
class TorrentFailed:
    key: SegmentKey
    message: str


SwarmEvent = PieceFinished | SegmentFinished | SegmentChecked | HashFailed | TorrentFailed
