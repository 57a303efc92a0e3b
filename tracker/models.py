"""Records that cross the wire between agents and the tracker, and their validation.

Every type here has `to_wire()` (a plain dict/list tree that msgpack encodes)
and `from_wire()`; server, client and both backends share them so the two
ends cannot drift. Validation helpers live here too, because the server
checks input and the client checks nothing twice.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Union

from tracker.errors import BadRequest

MiB = 1024 * 1024
DEFAULT_SEGMENT_SIZE = 32 * MiB
DEFAULT_PIECE_SIZE = 128 * 1024
MAX_SEGMENTS = 256              # segments grow past this: bounded records, bounded torrents per blob
MAX_PIECES_PER_SEGMENT = 16384  # pieces grow past this: metainfo stays under 320 KiB
MIN_PIECE_SIZE = 16 * 1024      # BitTorrent's block size; smaller pieces make no sense
MAX_PIECE_SIZE = 64 * MiB
MAX_SEGMENT_SIZE = 2 ** 36      # 64 GiB: MAX_BLOB_SIZE / MAX_SEGMENTS
MAX_BLOB_SIZE = 2 ** 44         # 16 TiB: anything larger is a bug or an attack
MAX_METAINFO = 4 * MiB          # 64 GiB segment / 16 KiB pieces would be 80 MiB; real ones are a few KiB

ALL: Literal["all"] = "all"
Holding = Union[Literal["all"], frozenset[int]]
"""What a node holds of one blob: every segment (verified whole blob) or some segment indexes."""

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
_HOST = re.compile(r"^[A-Za-z0-9.:\[\]_-]{1,253}$")


# Validation ------------------------------------------------------------------

def check_digest(digest: Any) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise BadRequest(f"invalid digest {str(digest)[:100]!r}: expected sha256:<64 lowercase hex>")
    return digest


def check_node_id(node: Any, name: str = "node") -> str:
    if not isinstance(node, str) or not _NODE_ID.match(node):
        raise BadRequest(f"{name}: invalid node id {str(node)[:140]!r} (1-128 of A-Za-z0-9._:@-)")
    return node


def check_int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{name}: expected an integer in [{lo}, {hi}], got {str(value)[:40]!r}")
    return value


def check_segments(value: Any, name: str = "segments", count: int | None = None) -> list[int]:
    """A list of segment indexes, deduplicated in order; range-checked when the blob is known."""
    if not isinstance(value, (list, tuple)) or len(value) > 1 << 16:
        raise BadRequest(f"{name}: expected a list of segment indexes")
    hi = (count - 1) if count is not None else (1 << 20)
    out: dict[int, None] = {}
    for item in value:
        if count is not None and isinstance(item, int) and not isinstance(item, bool) and item >= count:
            raise BadRequest(f"{name}: segment {item} out of range (blob has {count} segments)")
        out[check_int(item, name, 0, hi)] = None
    return list(out)


def check_labels(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 16:
        raise BadRequest("labels: expected a map of at most 16 string labels")
    for k, v in value.items():
        if not isinstance(k, str) or not _LABEL_KEY.match(k) or not isinstance(v, str) or len(v) > 128:
            raise BadRequest(f"labels: invalid label {str(k)[:64]!r}")
    return dict(value)


def check_holding(value: Any, name: str) -> Holding:
    if value == ALL:
        return ALL
    return frozenset(check_segments(value, name))


def choose_geometry(size: int, segment_size: int | None = None,
                    piece_size: int | None = None) -> tuple[int, int]:
    """Segment and piece size for a new blob record.

    The first registrar may propose sizes (power-of-two only, so every piece
    boundary is also a segment boundary); the segment size then doubles until
    the blob has at most MAX_SEGMENTS segments, so a 10 TiB blob does not turn
    into 160 000 torrents. Pieces double while a segment would have more than
    MAX_PIECES_PER_SEGMENT (its metainfo must stay small), and never exceed a segment.
    """
    check_int(size, "size", 0, MAX_BLOB_SIZE)
    seg = DEFAULT_SEGMENT_SIZE if segment_size is None else segment_size
    piece = DEFAULT_PIECE_SIZE if piece_size is None else piece_size
    _check_pow2(seg, "segment_size", MIN_PIECE_SIZE, MAX_SEGMENT_SIZE)
    _check_pow2(piece, "piece_size", MIN_PIECE_SIZE, MAX_PIECE_SIZE)
    while -(-size // seg) > MAX_SEGMENTS:
        seg *= 2
    while seg // piece > MAX_PIECES_PER_SEGMENT:
        piece *= 2
    return seg, min(piece, seg)


def _check_pow2(value: Any, name: str, lo: int, hi: int) -> None:
    check_int(value, name, lo, hi)
    if value & (value - 1):
        raise BadRequest(f"{name}: must be a power of two, got {value}")


def info_hash(metainfo: bytes) -> str:
    """BitTorrent v1 info-hash: SHA-1 of the bencoded info dict, as 40 hex digits."""
    return hashlib.sha1(metainfo).hexdigest()


# Records --------------------------------------------------------------------

@dataclass(frozen=True)
class SegmentMeta:
    """A published segment: the torrent info dict (opaque bytes) and who published it."""

    index: int
    metainfo: bytes
    node: str
    info_hash: str

    def to_wire(self) -> dict[str, Any]:
        return {"index": self.index, "metainfo": self.metainfo, "node": self.node,
                "info_hash": self.info_hash}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> "SegmentMeta":
        return cls(int(d["index"]), bytes(d["metainfo"]), str(d["node"]), str(d["info_hash"]))


@dataclass
class BlobRecord:
    """Geometry of one blob plus the metainfo of every published segment.

    `version` grows by one on each publish or withdraw, which is what the
    long-poll (`wait`) compares against.
    """

    digest: str
    size: int
    segment_size: int
    piece_size: int
    version: int = 0
    segments: dict[int, SegmentMeta] = field(default_factory=dict)

    @property
    def segment_count(self) -> int:
        return -(-self.size // self.segment_size)

    def segment_span(self, index: int) -> tuple[int, int]:
        """Byte range [start, end) of a segment within the blob."""
        start = index * self.segment_size
        return start, min(start + self.segment_size, self.size)

    @property
    def complete(self) -> bool:
        """Every segment has published metainfo."""
        return len(self.segments) == self.segment_count

    def missing(self) -> list[int]:
        return [i for i in range(self.segment_count) if i not in self.segments]

    def to_wire(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size, "segment_size": self.segment_size,
                "piece_size": self.piece_size, "segment_count": self.segment_count,
                "version": self.version,
                "segments": [self.segments[i].to_wire() for i in sorted(self.segments)]}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> "BlobRecord":
        segs = [SegmentMeta.from_wire(s) for s in d.get("segments") or ()]
        return cls(str(d["digest"]), int(d["size"]), int(d["segment_size"]), int(d["piece_size"]),
                   int(d["version"]), {s.index: s for s in segs})


@dataclass
class LeaseGrant:
    """Answer to a lease claim.

    granted: segments the caller now holds leases on (fetch these upstream);
    renewed: the subset it already held (a retried claim is harmless);
    reclaimed: the subset taken over from a holder whose lease had expired;
    holders: every other unpublished segment under a live lease → holder node;
    expires_in: seconds until the soonest of other nodes' live leases ends (None
      when they hold none). A refused claimer asks again then: a holder that died
      is replaced the moment its lease lapses, and a live one will have renewed.
    """

    digest: str
    granted: list[int]
    ttl: float
    version: int
    renewed: list[int] = field(default_factory=list)
    reclaimed: list[int] = field(default_factory=list)
    holders: dict[int, str] = field(default_factory=dict)
    expires_in: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"digest": self.digest, "granted": self.granted, "ttl": self.ttl,
                "version": self.version, "renewed": self.renewed, "reclaimed": self.reclaimed,
                "holders": [[i, n] for i, n in sorted(self.holders.items())],
                "expires_in": self.expires_in}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> "LeaseGrant":
        return cls(str(d["digest"]), list(d["granted"]), float(d["ttl"]), int(d["version"]),
                   list(d.get("renewed") or ()), list(d.get("reclaimed") or ()),
                   {int(i): str(n) for i, n in d.get("holders") or ()},
                   None if d.get("expires_in") is None else float(d["expires_in"]))


@dataclass
class LeaseRenewal:
    """renewed: leases extended by `ttl`; lost: not ours any more (expired and re-leased, or published)."""

    renewed: list[int]
    lost: list[int]
    ttl: float

    def to_wire(self) -> dict[str, Any]:
        return {"renewed": self.renewed, "lost": self.lost, "ttl": self.ttl}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> "LeaseRenewal":
        return cls(list(d["renewed"]), list(d["lost"]), float(d["ttl"]))


@dataclass(frozen=True)
class Node:
    """A live agent: its BitTorrent listen address, its HTTP base URL for piece reads, its topology."""

    node_id: str
    host: str
    port: int
    http: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"node": self.node_id, "host": self.host, "port": self.port, "http": self.http,
                "labels": dict(self.labels)}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> "Node":
        """Validating constructor: this is where announce input is checked."""
        host = d.get("host")
        if not isinstance(host, str) or not _HOST.match(host):
            raise BadRequest(f"host: invalid host {str(host)[:100]!r}")
        http = d.get("http")
        if http is not None and (not isinstance(http, str) or len(http) > 512
                                 or not re.match(r"^https?://[^\s]+$", http)):
            raise BadRequest("http: expected an http(s):// base URL")
        return cls(check_node_id(d.get("node")), host, check_int(d.get("port"), "port", 1, 65535),
                   http, check_labels(d.get("labels")))


@dataclass
class AnnounceReply:
    """ttl: how long this announce keeps the node alive; interval: when to announce next.

    resync: the tracker had no live record of the node before this announce
    (first contact, expiry, tracker restart with the memory backend), so it
    may have forgotten what the node holds: send a full announce next.
    """

    ttl: float
    interval: float
    resync: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"ttl": self.ttl, "interval": self.interval, "resync": self.resync}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> "AnnounceReply":
        return cls(float(d["ttl"]), float(d["interval"]), bool(d.get("resync")))


@dataclass
class Peer:
    """A live holder of (part of) a blob. `segments` lists what a partial holder has; empty when
    complete. `fetching`: the node is downloading the blob, so it trades pieces of every segment."""

    node_id: str
    host: str
    port: int
    http: str | None
    labels: dict[str, str]
    complete: bool
    segments: tuple[int, ...] = ()
    fetching: bool = False

    def has(self, index: int) -> bool:
        return self.complete or index in self.segments

    def to_wire(self) -> dict[str, Any]:
        return {"node": self.node_id, "host": self.host, "port": self.port, "http": self.http,
                "labels": self.labels, "complete": self.complete, "segments": list(self.segments),
                "fetching": self.fetching}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> "Peer":
        return cls(str(d["node"]), str(d["host"]), int(d["port"]), d.get("http"),
                   dict(d.get("labels") or {}), bool(d["complete"]), tuple(d.get("segments") or ()),
                   bool(d.get("fetching")))


@dataclass
class Stats:
    """Gauges for /metrics: records known and live nodes."""

    blobs: int
    nodes: int
