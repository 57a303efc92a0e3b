"""fleetp2p tracker: maps blob digests to segments, leases and the peers that hold them.

Data model
----------
* **Blob record** (per digest): size and geometry — segment size and piece
  size, chosen by the first agent that registers the digest and immutable
  afterwards — plus, per segment, the published metainfo (the bencoded
  torrent info dict, opaque here; its SHA-1 is the torrent's info-hash) and
  the node that published it. A `version` counter grows on every publish or
  withdraw; long-polls wait on it.
* **Why segments**: a torrent needs every piece hash before anyone can
  verify a byte, so one torrent per blob would make the whole fleet wait for
  one complete upstream download. One torrent per segment (32 MiB by
  default, at most ~256 per blob) lets the fleet swarm segment 0 while the
  fetcher still downloads segment 1.
* **Why leases**: when many agents want the same cold blob at once, each
  claims a lease on different unpublished segments and fetches only those
  from upstream (Range requests), so upstream serves about one copy of the
  blob and the cold download runs in parallel. Leases are short (15 s,
  renewed while the fetch progresses) so a dead fetcher's segment passes to
  the next claimer; a refused claim says when the soonest lease of another
  node ends, so the claimer asks again then rather than polling.
* **Nodes** announce their BitTorrent endpoint, HTTP endpoint, topology
  labels and which segments (or "all") of which blobs they hold; they stay
  live for a TTL (30 s) and re-announce. Peer queries return a random sample
  of live holders, same zone/rack first, complete holders before partial.
* **Withdraw**: an agent whose assembled blob fails its sha256 reports the
  segment; its metainfo is removed from the record and from every holder,
  and the segment becomes claimable again.

Modules: models (wire dataclasses), backend (the Protocol both storages
implement), memory / redisbackend (+ redis_scripts), server (`create_app`),
client (`TrackerClient`), metrics, run (`run`, `serve`).
"""

from tracker.backend import Backend, Timeouts
from tracker.client import TrackerClient
from tracker.errors import (TrackerClientError, TrackerConflict, TrackerError, TrackerNotFound,
                            TrackerUnauthorized, TrackerUnavailable)
from tracker.memory import MemoryBackend
from tracker.models import (ALL, AnnounceReply, BlobRecord, LeaseGrant, LeaseRenewal, Node, Peer,
                            SegmentMeta, choose_geometry)
from tracker.server import create_app

__all__ = [
    "ALL", "AnnounceReply", "Backend", "BlobRecord", "LeaseGrant", "LeaseRenewal", "MemoryBackend",
    "Node", "Peer", "SegmentMeta", "Timeouts", "TrackerClient", "TrackerClientError",
    "TrackerConflict", "TrackerError", "TrackerNotFound", "TrackerUnauthorized",
    "TrackerUnavailable", "choose_geometry", "create_app",
]
