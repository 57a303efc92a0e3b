"""The swarm: libtorrent and nothing else. One session per agent, one torrent per blob segment."""

from fleetp2p.swarm.events import (HashFailed, PieceFinished, SegmentChecked, SegmentFinished,
                                   SegmentKey, SwarmEvent, TorrentFailed)
from fleetp2p.swarm.metainfo import PieceHasher, make_metainfo
from fleetp2p.swarm.session import Swarm

__all__ = ["HashFailed", "PieceFinished", "PieceHasher", "SegmentChecked", "SegmentFinished",
           "SegmentKey", "Swarm", "SwarmEvent", "TorrentFailed", "make_metainfo"]
