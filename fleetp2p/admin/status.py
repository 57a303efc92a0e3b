"""The agent's view of itself, as `GET /_fleetp2p/v1/status` returns it.

Counters are read from the agent's Prometheus registry by metric name, so
the status shows exactly what /metrics exports (and picks up the swarm's
metrics — fetched bytes by source, peers — as soon as they exist). Swarm
fields the agent cannot fill yet are null; the CLI shows them as "n/a".
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from fleetp2p import __version__
from fleetp2p.admin.pull import bytes_by_source

if TYPE_CHECKING:
    from fleetp2p.agent import Agent


def build_status(agent: "Agent") -> dict[str, Any]:
    config = agent.config
    samples = _samples(agent.metrics.registry)
    return {
        "version": __version__,
        "listen": config.listen,
        "default_registry": config.default_registry,
        "data_dir": config.data_dir,
        "store": _store(agent),
        "pins": _pins(agent),
        "inflight": _inflight(agent),
        "served_bytes": _by_label(samples, "fleetp2p_served_bytes_total", "source"),
        "fetched_bytes": _by_label(samples, "fleetp2p_fetched_bytes_total", "source") or None,
        "upstream": {
            "registries": [{"name": r.name, "url": r.url} for r in config.registries],
            "bytes": _by_label(samples, "fleetp2p_upstream_bytes_total", "kind"),
            "errors": _errors(samples),
        },
        "verification_failures": sum(_by_label(samples, "fleetp2p_verification_failures_total",
                                               "kind").values()),
        "swarm": _swarm(agent, samples),
    }


def _store(agent: "Agent") -> dict[str, Any]:
    store = agent.store
    used = store.total_bytes
    limit = store.limit
    pinned = set().union(*store.pins().values()) if store.pins() else set()
    pinned_bytes = sum(e.size for e in store.entries() if str(e.digest) in pinned)
    try:
        free = shutil.disk_usage(agent.config.data_dir).free
    except OSError:
        free = None
    return {"bytes": used, "blobs": len(store.entries()), "limit": limit,
            "high_watermark": store.high, "low_watermark": store.low,
            "high_bytes": int(limit * store.high), "low_bytes": int(limit * store.low),
            "usage": used / limit if limit else None,
            "above_high_watermark": used > limit * store.high,
            "pinned_bytes": pinned_bytes, "disk_free_bytes": free}


def _pins(agent: "Agent") -> list[dict[str, Any]]:
    sizes = {str(e.digest): e.size for e in agent.store.entries()}
    result = []
    for label, digests in sorted(agent.store.pins().items()):
        present = [d for d in digests if d in sizes]
        result.append({"label": label, "digests": len(digests), "present": len(present),
                       "bytes": sum(sizes[d] for d in present)})
    return result


def _inflight(agent: "Agent") -> list[dict[str, Any]]:
    result = []
    for download in agent.blobs.inflight():
        size = getattr(download, "size", -1)
        by_source = bytes_by_source(download, size) if size >= 0 else {}
        result.append({"digest": str(getattr(download, "digest", "")), "size": size,
                       "done": getattr(download, "written", 0),
                       "source": max(by_source, key=by_source.__getitem__) if by_source else None,
                       "by_source": by_source})
    return result


def _swarm(agent: "Agent", samples: dict[str, list[tuple[dict[str, str], float]]]) -> dict[str, Any]:
    """What the swarm reports; every field stays null while the agent runs
    without one (tracker = "none") or before it has started."""
    config = agent.config
    swarm = getattr(agent, "swarm", None)
    announcer = getattr(agent, "announcer", None)
    node = getattr(agent, "node", None)
    info: dict[str, Any] = {"enabled": swarm is not None,
                            "tracker_url": getattr(config, "tracker_url", None),
                            "tracker_reachable": None, "peers": None, "peer_listen": None,
                            "node_id": None}
    if swarm is None:
        return info
    if announcer is not None and isinstance(getattr(announcer, "reachable", None), bool):
        info["tracker_reachable"] = announcer.reachable
    peers = samples.get("fleetp2p_peers_connected")
    if peers:
        info["peers"] = int(sum(v for _, v in peers))
    if node is not None:
        info["node_id"] = getattr(node, "node_id", None)
        host, port = getattr(node, "host", None), getattr(node, "port", None)
        if host and port:
            info["peer_listen"] = f"{host}:{port}"
    return info


# Metrics -------------------------------------------------------------------

def _samples(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    by_name: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in registry.collect():
        for sample in family.samples:
            by_name[sample.name].append((dict(sample.labels), sample.value))
    return by_name


def _by_label(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
              label: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for labels, value in samples.get(name, []):
        key = labels.get(label, "")
        totals[key] = totals.get(key, 0) + int(value)
    return totals


def _errors(samples: dict[str, list[tuple[dict[str, str], float]]]) -> dict[str, int]:
    """Upstream errors as `kind/reason` → count, zero counts left out."""
    result = {}
    for labels, value in samples.get("fleetp2p_upstream_errors_total", []):
        if value:
            result[f"{labels.get('kind', '?')}/{labels.get('reason', '?')}"] = int(value)
    return result
