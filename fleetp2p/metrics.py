"""Prometheus metrics of one agent.

Each agent owns its CollectorRegistry (not the process-global one) so tests
can run several agents in one process. Labels are bounded: never a digest,
repository or peer address.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SOURCES = ("local", "upstream", "peer")
HEDGE_WINNERS = ("holder", "other", "none")
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "fleetp2p_requests", "Client requests by endpoint, method and status",
            ["endpoint", "method", "status"], registry=r)
        self.served_bytes = Counter(
            "fleetp2p_served_bytes", "Blob bytes sent to clients, by where they came from",
            ["source"], registry=r)
        self.upstream_requests = Counter(
            "fleetp2p_upstream_requests", "Requests sent to upstream registries",
            ["kind", "status"], registry=r)
        self.upstream_errors = Counter(
            "fleetp2p_upstream_errors", "Upstream failures by kind and reason",
            ["kind", "reason"], registry=r)
        self.upstream_bytes = Counter(
            "fleetp2p_upstream_bytes", "Bytes received from upstream registries",
            ["kind"], registry=r)
        self.coalesced = Counter(
            "fleetp2p_coalesced_waiters", "Requests that joined a fetch already in flight",
            ["kind"], registry=r)
        self.waiters = Gauge(
            "fleetp2p_inflight_waiters", "Client requests currently waiting on an in-flight fetch",
            registry=r)
        self.inflight = Gauge(
            "fleetp2p_inflight_fetches", "Blob fetches currently in flight", registry=r)
        self.ttfb = Histogram(
            "fleetp2p_time_to_first_byte_seconds",
            "Time from request to the first body byte, by source", ["source"],
            buckets=TTFB_BUCKETS, registry=r)
        self.store_bytes = Gauge("fleetp2p_store_bytes", "Bytes of complete blobs in the store",
                                 registry=r)
        self.store_blobs = Gauge("fleetp2p_store_blobs", "Complete blobs in the store", registry=r)
        self.store_limit = Gauge("fleetp2p_store_limit_bytes", "Configured store size limit",
                                 registry=r)
        self.store_pinned_bytes = Gauge("fleetp2p_store_pinned_bytes", "Bytes of pinned blobs",
                                        registry=r)
        self.store_partial_bytes = Gauge("fleetp2p_store_partial_bytes",
                                         "Bytes of interrupted downloads kept to resume (not "
                                         "being fetched now); GC evicts them first", registry=r)
        self.evictions = Counter("fleetp2p_store_evictions", "Blobs evicted by GC", registry=r)
        self.evicted_bytes = Counter("fleetp2p_store_evicted_bytes",
                                     "Bytes evicted by GC (blobs and interrupted downloads)",
                                     registry=r)
        self.verification_failures = Counter(
            "fleetp2p_verification_failures", "Content that did not match its digest",
            ["kind"], registry=r)
        # Swarm
        self.peers_connected = Gauge("fleetp2p_peers_connected", "BitTorrent peers connected",
                                     registry=r)
        self.torrents = Gauge("fleetp2p_swarm_torrents", "Segment torrents in the session",
                              registry=r)
        self.segments = Counter("fleetp2p_segments_fetched",
                                "Blob segments completed, by where they came from", ["source"],
                                registry=r)
        self.fetched_bytes = Counter("fleetp2p_fetched_bytes",
                                     "Blob bytes brought onto this node, by source", ["source"],
                                     registry=r)
        self.resumed_bytes = Counter("fleetp2p_resumed_bytes",
                                     "Bytes an interrupted download had left on disk that "
                                     "passed their piece hashes and were kept", registry=r)
        self.lease_waits = Counter("fleetp2p_lease_waits",
                                   "Times a segment was leased to another node and we waited for it",
                                   registry=r)
        self.piece_hash_failures = Counter("fleetp2p_piece_hash_failures",
                                           "Pieces from peers that failed their hash", registry=r)
        self.tracker_latency = Histogram("fleetp2p_tracker_request_seconds",
                                         "Tracker API latency by operation", ["op"],
                                         buckets=TTFB_BUCKETS, registry=r)
        self.tracker_errors = Counter("fleetp2p_tracker_errors", "Failed tracker calls", ["op"],
                                      registry=r)
        # Lazy pull
        self.lazy_layers = Gauge("fleetp2p_lazy_layers", "Lazily readable layers known from manifests",
                                 registry=r)
        self.lazy_requested_bytes = Counter(
            "fleetp2p_lazy_requested_bytes", "Bytes clients asked for in range reads of lazy layers",
            registry=r)
        self.lazy_fetched_bytes = Counter(
            "fleetp2p_lazy_fetched_bytes", "Bytes fetched to answer lazy range reads, by source",
            ["source"], registry=r)
        self.peer_served_bytes = Counter(
            "fleetp2p_peer_served_bytes", "Bytes this node served to other nodes over HTTP",
            registry=r)
        self.read_hedges = Counter(
            "fleetp2p_read_hedges", "First-piece reads that also asked other downloaders "
            "because the holder was slow, by who answered first (holder, other, none)",
            ["winner"], registry=r)
        # Every series exists from the start: a rate needs two samples, and a series
        # born with its whole burst already counted never shows one.
        for source in SOURCES:
            self.lazy_fetched_bytes.labels(source)
            self.segments.labels(source)
            self.fetched_bytes.labels(source)
        for source in SOURCES:
            self.served_bytes.labels(source)
            self.ttfb.labels(source)
        for winner in HEDGE_WINNERS:
            self.read_hedges.labels(winner)
        for kind in ("blob", "manifest"):
            self.verification_failures.labels(kind)
            self.upstream_bytes.labels(kind)
