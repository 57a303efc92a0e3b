"""Prometheus metrics of one tracker app.

Each app gets its own CollectorRegistry (several apps live in one test
process; an agent embedding the tracker may pass its own registry instead).
Labels are bounded: the route template, the method and the status code —
never a digest or a node id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tracker.models import Stats

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0, 60.0)


class TrackerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.announces = Counter("fleetp2p_tracker_announces", "Node announces accepted", registry=r)
        self.leases_granted = Counter("fleetp2p_tracker_leases_granted",
                                      "Segment fetch leases newly granted (renewals excluded)",
                                      registry=r)
        self.leases_reclaimed = Counter(
            "fleetp2p_tracker_leases_reclaimed",
            "Leases granted on a segment whose previous holder's lease had expired", registry=r)
        self.segments_published = Counter(
            "fleetp2p_tracker_segments_published",
            "Segment metainfo publishes accepted (idempotent repeats included)", registry=r)
        self.segments_withdrawn = Counter("fleetp2p_tracker_segments_withdrawn",
                                          "Segment withdraw requests (bad metainfo reported)",
                                          registry=r)
        self.blobs = Gauge("fleetp2p_tracker_blobs", "Blob records known", registry=r)
        self.nodes = Gauge("fleetp2p_tracker_nodes", "Live nodes (announced within their TTL)",
                           registry=r)
        self.waiters = Gauge("fleetp2p_tracker_waiters", "Long-polls in progress on this tracker",
                             registry=r)
        self.requests = Counter("fleetp2p_tracker_requests", "HTTP requests by route and status",
                                ["endpoint", "method", "code"], registry=r)
        self.latency = Histogram("fleetp2p_tracker_request_duration_seconds",
                                 "HTTP request latency by route (long-polls included)",
                                 ["endpoint", "method"], buckets=_LATENCY_BUCKETS, registry=r)

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint, method).observe(seconds)

    def set_stats(self, stats: Stats) -> None:
        self.blobs.set(stats.blobs)
        self.nodes.set(stats.nodes)
