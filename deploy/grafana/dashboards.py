"""Generate the Grafana dashboards in this directory from compact panel lists.

    python deploy/grafana/dashboards.py           # (re)write the *.json files
    python deploy/grafana/dashboards.py --check   # exit 1 if a JSON file is stale

Every query uses only metrics the code exports (fleetp2p/metrics.py,
tracker/metrics.py) and only bounded labels (job, instance, source, kind,
status, reason, endpoint, method, code, op, le): never a digest, a repository or a
peer. tests/test_deploy.py runs every query of every panel against a real
Prometheus scraping a real agent and tracker, so a panel whose metric is not
exported fails the suite.

Grafana variables: `datasource` (any Prometheus data source), `job` (the scrape
job, from prometheus.yml) and, on the node dashboard, `instance`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
RANGE = "$__range"


@dataclass(frozen=True)
class Query:
    """One PromQL target; `legend` uses Grafana's {{label}} syntax."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    width: int = 12
    height: int = 8
    description: str = ""
    stacked: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Variable:
    """A query variable filled from `label_values(metric, label)`."""

    name: str
    label: str
    query: str


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    variables: tuple[Variable, ...] = field(default_factory=tuple)
    filename: str = ""


def q(expr: str, legend: str = "") -> Query:
    return Query(" ".join(expr.split()), legend)


def stat(title: str, expr: str, unit: str = "short", description: str = "") -> Panel:
    return Panel(title, (q(expr),), unit=unit, kind="stat", width=4, height=4, description=description)


# --- Fleet overview ---------------------------------------------------------------

AGENT = 'job=~"$job"'
SERVED = f"sum(increase(fleetp2p_served_bytes_total{{{AGENT}}}[{RANGE}]))"
UPSTREAM_BLOBS = f'sum(increase(fleetp2p_upstream_bytes_total{{{AGENT},kind="blob"}}[{RANGE}]))'

FLEET = Dashboard(
    uid="fleetp2p-fleet",
    title="fleetp2p / Fleet overview",
    filename="fleetp2p-fleet.json",
    description="Where the fleet's blob bytes come from, how fast they arrive, and what goes wrong.",
    variables=(Variable("job", "Agent job", "label_values(fleetp2p_served_bytes_total, job)"),),
    rows=(
        Row("Fleet (over the selected time range)", (
            stat("Agents up", f"sum(up{{{AGENT}}})",
                 description="Agents Prometheus scraped successfully."),
            stat("Bytes served", SERVED, "bytes",
                 description="Blob bytes the agents sent to containerd, podman and other clients."),
            stat("Fetched from upstream", UPSTREAM_BLOBS, "bytes",
                 description="Blob bytes the agents downloaded from upstream registries."),
            stat("Upstream bytes saved", f"clamp_min({SERVED} - {UPSTREAM_BLOBS}, 0)", "bytes",
                 description="Bytes served minus bytes fetched from upstream: what the local stores, "
                             "coalesced fetches and peers spared the upstream registries."),
            stat("Share served by peers",
                 f'sum(increase(fleetp2p_served_bytes_total{{{AGENT},source="peer"}}[{RANGE}])) / {SERVED}',
                 "percentunit", description="Fraction of served bytes that came from other agents."),
            stat("Share served from local stores",
                 f'sum(increase(fleetp2p_served_bytes_total{{{AGENT},source="local"}}[{RANGE}])) / {SERVED}',
                 "percentunit", description="Fraction of served bytes that were already on the node."),
        )),
        Row("Traffic by source", (
            Panel("Bytes served by source", (
                q(f"sum by (source) (rate(fleetp2p_served_bytes_total{{{AGENT}}}[{RATE}]))", "{{source}}"),
            ), unit="Bps", stacked=True,
                description="Fleet-wide blob bytes per second to clients: local store, peers or upstream."),
            Panel("Served vs fetched from upstream", (
                q(f"sum(rate(fleetp2p_served_bytes_total{{{AGENT}}}[{RATE}]))", "served to clients"),
                q(f'sum(rate(fleetp2p_upstream_bytes_total{{{AGENT},kind="blob"}}[{RATE}]))',
                  "fetched from upstream"),
            ), unit="Bps",
                description="The gap between the two lines is what the fleet did not have to download."),
            Panel("Time to first byte by source", (
                q(f"histogram_quantile(0.5, sum by (le, source) "
                  f"(rate(fleetp2p_time_to_first_byte_seconds_bucket{{{AGENT}}}[{RATE}])))", "{{source}} p50"),
                q(f"histogram_quantile(0.95, sum by (le, source) "
                  f"(rate(fleetp2p_time_to_first_byte_seconds_bucket{{{AGENT}}}[{RATE}])))", "{{source}} p95"),
            ), unit="s", description="From a client's request to the first body byte sent, fleet-wide."),
            Panel("Throughput by source, busiest node", (
                q(f"max by (source) (rate(fleetp2p_served_bytes_total{{{AGENT}}}[{RATE}]))", "{{source}}"),
            ), unit="Bps", description="Bytes per second the busiest node served from each source."),
        )),
        Row("Swarm", (
            Panel("Peers connected", (
                q(f"sum(fleetp2p_peers_connected{{{AGENT}}})", "connections, fleet"),
                q(f"max(fleetp2p_peers_connected{{{AGENT}}})", "busiest node"),
            ), width=8, description="BitTorrent peer connections."),
            Panel("Segments completed by source", (
                q(f"sum by (source) (rate(fleetp2p_segments_fetched_total{{{AGENT}}}[{RATE}]))", "{{source}}"),
            ), unit="ops", width=8, stacked=True,
                description="Blob segments brought onto nodes from upstream vs from peers."),
            Panel("Bytes fetched onto nodes by source", (
                q(f"sum by (source) (rate(fleetp2p_fetched_bytes_total{{{AGENT}}}[{RATE}]))", "{{source}}"),
                q(f"sum(rate(fleetp2p_resumed_bytes_total{{{AGENT}}}[{RATE}]))", "kept after a restart"),
            ), unit="Bps", width=8, stacked=True,
                description="Bytes from upstream and from peers, and bytes an interrupted download "
                            "had left on disk that a restarted agent checked and kept."),
            Panel("Lease waits", (
                q(f"sum(rate(fleetp2p_lease_waits_total{{{AGENT}}}[{RATE}]))", "waits"),
            ), unit="ops", width=8,
                description="A cold segment was leased to another node, so this node waited for it "
                            "instead of fetching it from upstream too."),
            Panel("Tracker call latency (agents)", (
                q(f"histogram_quantile(0.95, sum by (le, op) "
                  f"(rate(fleetp2p_tracker_request_seconds_bucket{{{AGENT}}}[{RATE}])))", "{{op}} p95"),
            ), unit="s", width=8, description="As the agents see it: announce, claim, publish, peers, ..."),
            Panel("Tracker call failures (agents)", (
                q(f"sum by (op) (rate(fleetp2p_tracker_errors_total{{{AGENT}}}[{RATE}]))", "{{op}}"),
            ), unit="ops", width=8,
                description="Tracker unreachable: agents fall back to upstream for those blobs."),
        )),
        Row("Fetch path", (
            Panel("Pulls in flight", (
                q(f"sum(fleetp2p_inflight_fetches{{{AGENT}}})", "blob fetches"),
                q(f"sum(fleetp2p_inflight_waiters{{{AGENT}}})", "requests waiting on a fetch"),
            ), width=8, description="Blob fetches running now and the client requests waiting on them."),
            Panel("Coalesced waiters", (
                q(f"sum by (kind) (rate(fleetp2p_coalesced_waiters_total{{{AGENT}}}[{RATE}]))", "{{kind}}"),
            ), unit="reqps", width=8,
                description="Requests per second that joined a fetch already in flight instead of "
                            "starting their own."),
            Panel("Upstream requests by status", (
                q(f"sum by (kind, status) (rate(fleetp2p_upstream_requests_total{{{AGENT}}}[{RATE}]))",
                  "{{kind}} {{status}}"),
            ), unit="reqps", width=8),
        )),
        Row("Errors", (
            Panel("Upstream errors by reason", (
                q(f"sum by (kind, reason) (rate(fleetp2p_upstream_errors_total{{{AGENT}}}[{RATE}]))",
                  "{{kind}} {{reason}}"),
            ), unit="reqps", width=8,
                description="Timeouts, connection errors, stalls, 5xx, 429, 404 and invalid replies."),
            Panel("Client requests answered with an error", (
                q(f'sum by (endpoint, status) (rate(fleetp2p_requests_total{{{AGENT},status=~"[45].."}}[{RATE}]))',
                  "{{endpoint}} {{status}}"),
            ), unit="reqps", width=8,
                description="A 404 sends containerd to the upstream registry itself; 5xx means the "
                            "agent failed."),
            Panel("Verification and piece hash failures", (
                q(f"sum by (kind) (increase(fleetp2p_verification_failures_total{{{AGENT}}}[{RATE}]))",
                  "{{kind}} digest mismatch"),
                q(f"sum(increase(fleetp2p_piece_hash_failures_total{{{AGENT}}}[{RATE}]))",
                  "pieces from peers failing their hash"),
            ), width=8, description="Content that did not match its digest (thrown away and refetched) "
                                    "and pieces from peers that failed their hash (dropped)."),
        )),
        Row("Store", (
            Panel("Store usage, fullest nodes", (
                q(f"topk(5, fleetp2p_store_bytes{{{AGENT}}} / fleetp2p_store_limit_bytes{{{AGENT}}})",
                  "{{instance}}"),
            ), unit="percentunit",
                description="Used fraction of store_max_size; eviction starts at the high watermark "
                            "(0.95 by default)."),
            Panel("Evicted by GC", (
                q(f"sum(rate(fleetp2p_store_evicted_bytes_total{{{AGENT}}}[{RATE}]))", "bytes evicted"),
            ), unit="Bps"),
        )),
    ),
)

# --- Tracker --------------------------------------------------------------------------

TRACKER_JOB = 'job=~"$job"'

TRACKER = Dashboard(
    uid="fleetp2p-tracker",
    title="fleetp2p / Tracker",
    filename="fleetp2p-tracker.json",
    description="The trackers: announces, fetch leases, segment metainfo, live peers, API latency.",
    variables=(Variable("job", "Tracker job", "label_values(fleetp2p_tracker_announces_total, job)"),),
    rows=(
        Row("Now", (
            stat("Trackers up", f"sum(up{{{TRACKER_JOB}}})"),
            # Replicas over one Redis all report the same shared counts: max, not sum.
            stat("Live nodes", f"max(fleetp2p_tracker_nodes{{{TRACKER_JOB}}})",
                 description="Nodes that announced within their TTL."),
            stat("Blobs known", f"max(fleetp2p_tracker_blobs{{{TRACKER_JOB}}})"),
            stat("Long-polls waiting", f"sum(fleetp2p_tracker_waiters{{{TRACKER_JOB}}})"),
            stat("Requests/s", f"sum(rate(fleetp2p_tracker_requests_total{{{TRACKER_JOB}}}[{RATE}]))",
                 "reqps"),
            stat("Error share",
                 f'(sum(rate(fleetp2p_tracker_requests_total{{{TRACKER_JOB},code=~"5.."}}[{RATE}])) or vector(0)) '
                 f"/ sum(rate(fleetp2p_tracker_requests_total{{{TRACKER_JOB}}}[{RATE}]))",
                 "percentunit", description="Fraction of requests answered with 5xx."),
        )),
        Row("Swarm bookkeeping", (
            Panel("Announces", (
                q(f"sum(rate(fleetp2p_tracker_announces_total{{{TRACKER_JOB}}}[{RATE}]))", "announces"),
            ), unit="reqps", width=8),
            Panel("Fetch leases", (
                q(f"sum(rate(fleetp2p_tracker_leases_granted_total{{{TRACKER_JOB}}}[{RATE}]))", "granted"),
                q(f"sum(rate(fleetp2p_tracker_leases_reclaimed_total{{{TRACKER_JOB}}}[{RATE}]))",
                  "reclaimed after expiry"),
            ), unit="ops", width=8,
                description="Segment fetch leases for cold blobs; reclaimed: the previous holder's "
                            "lease had expired (a stalled or dead fetcher)."),
            Panel("Segment metainfo", (
                q(f"sum(rate(fleetp2p_tracker_segments_published_total{{{TRACKER_JOB}}}[{RATE}]))",
                  "published"),
                q(f"sum(rate(fleetp2p_tracker_segments_withdrawn_total{{{TRACKER_JOB}}}[{RATE}]))",
                  "withdrawn (bad content reported)"),
            ), unit="ops", width=8),
            Panel("Nodes and blobs", (
                q(f"max(fleetp2p_tracker_nodes{{{TRACKER_JOB}}})", "live nodes"),
                q(f"max(fleetp2p_tracker_blobs{{{TRACKER_JOB}}})", "blob records"),
            ), width=12),
            Panel("Long-polls waiting", (
                q(f"sum by (instance) (fleetp2p_tracker_waiters{{{TRACKER_JOB}}})", "{{instance}}"),
            ), width=12),
        )),
        Row("API", (
            Panel("Requests by endpoint", (
                q(f"sum by (endpoint, method) (rate(fleetp2p_tracker_requests_total{{{TRACKER_JOB}}}[{RATE}]))",
                  "{{method}} {{endpoint}}"),
            ), unit="reqps", width=8),
            Panel("Errors by endpoint and code", (
                q(f"sum by (endpoint, code) (rate(fleetp2p_tracker_requests_total"
                  f'{{{TRACKER_JOB},code=~"[45].."}}[{RATE}]))', "{{endpoint}} {{code}}"),
            ), unit="reqps", width=8),
            # Long-polls (/wait) last up to a minute by design: kept out of latency.
            Panel("Request latency", (
                q(f"histogram_quantile(0.5, sum by (le) (rate(fleetp2p_tracker_request_duration_seconds_bucket"
                  f'{{{TRACKER_JOB},endpoint!~".*/wait"}}[{RATE}])))', "p50"),
                q(f"histogram_quantile(0.95, sum by (le) (rate(fleetp2p_tracker_request_duration_seconds_bucket"
                  f'{{{TRACKER_JOB},endpoint!~".*/wait"}}[{RATE}])))', "p95"),
                q(f"histogram_quantile(0.99, sum by (le) (rate(fleetp2p_tracker_request_duration_seconds_bucket"
                  f'{{{TRACKER_JOB},endpoint!~".*/wait"}}[{RATE}])))', "p99"),
            ), unit="s", width=8, description="All endpoints except the /wait long-poll."),
            Panel("p95 latency by endpoint", (
                q(f"histogram_quantile(0.95, sum by (le, endpoint) (rate("
                  f"fleetp2p_tracker_request_duration_seconds_bucket{{{TRACKER_JOB}}}[{RATE}])))",
                  "{{endpoint}}"),
            ), unit="s", width=24),
        )),
    ),
)

# --- Node detail -------------------------------------------------------------------------

NODE_SEL = 'job=~"$job",instance=~"$instance"'

NODE = Dashboard(
    uid="fleetp2p-node",
    title="fleetp2p / Node detail",
    filename="fleetp2p-node.json",
    description="One agent: what it served from where, its fetches, errors and store.",
    variables=(
        Variable("job", "Agent job", "label_values(fleetp2p_served_bytes_total, job)"),
        Variable("instance", "Host", 'label_values(fleetp2p_store_bytes{job=~"$job"}, instance)'),
    ),
    rows=(
        Row("Node", (
            stat("Up", f"up{{{NODE_SEL}}}"),
            stat("Store used", f"fleetp2p_store_bytes{{{NODE_SEL}}}", "bytes"),
            stat("Store limit", f"fleetp2p_store_limit_bytes{{{NODE_SEL}}}", "bytes"),
            stat("Store usage", f"fleetp2p_store_bytes{{{NODE_SEL}}} / fleetp2p_store_limit_bytes{{{NODE_SEL}}}",
                 "percentunit"),
            stat("Pinned", f"fleetp2p_store_pinned_bytes{{{NODE_SEL}}}", "bytes"),
            stat("Blobs stored", f"fleetp2p_store_blobs{{{NODE_SEL}}}"),
        )),
        Row("Traffic", (
            Panel("Bytes served by source", (
                q(f"sum by (source) (rate(fleetp2p_served_bytes_total{{{NODE_SEL}}}[{RATE}]))", "{{source}}"),
            ), unit="Bps", stacked=True),
            Panel("Time to first byte by source", (
                q(f"histogram_quantile(0.5, sum by (le, source) "
                  f"(rate(fleetp2p_time_to_first_byte_seconds_bucket{{{NODE_SEL}}}[{RATE}])))", "{{source}} p50"),
                q(f"histogram_quantile(0.95, sum by (le, source) "
                  f"(rate(fleetp2p_time_to_first_byte_seconds_bucket{{{NODE_SEL}}}[{RATE}])))", "{{source}} p95"),
            ), unit="s"),
            Panel("Fetched from upstream", (
                q(f"sum by (kind) (rate(fleetp2p_upstream_bytes_total{{{NODE_SEL}}}[{RATE}]))", "{{kind}}"),
            ), unit="Bps"),
            Panel("Client requests", (
                q(f"sum by (endpoint, status) (rate(fleetp2p_requests_total{{{NODE_SEL}}}[{RATE}]))",
                  "{{endpoint}} {{status}}"),
            ), unit="reqps"),
        )),
        Row("Fetch path", (
            Panel("Pulls in flight", (
                q(f"fleetp2p_inflight_fetches{{{NODE_SEL}}}", "blob fetches"),
                q(f"fleetp2p_inflight_waiters{{{NODE_SEL}}}", "requests waiting on a fetch"),
            ), width=6),
            Panel("Coalesced waiters", (
                q(f"sum by (kind) (rate(fleetp2p_coalesced_waiters_total{{{NODE_SEL}}}[{RATE}]))", "{{kind}}"),
            ), unit="reqps", width=6),
            Panel("Upstream requests by status", (
                q(f"sum by (kind, status) (rate(fleetp2p_upstream_requests_total{{{NODE_SEL}}}[{RATE}]))",
                  "{{kind}} {{status}}"),
            ), unit="reqps", width=6),
            Panel("Upstream errors by reason", (
                q(f"sum by (kind, reason) (rate(fleetp2p_upstream_errors_total{{{NODE_SEL}}}[{RATE}]))",
                  "{{kind}} {{reason}}"),
            ), unit="reqps", width=6),
        )),
        Row("Swarm and lazy pulls", (
            Panel("Peers and torrents", (
                q(f"fleetp2p_peers_connected{{{NODE_SEL}}}", "peers connected"),
                q(f"fleetp2p_swarm_torrents{{{NODE_SEL}}}", "segment torrents"),
            ), width=6),
            Panel("Bytes fetched onto the node by source", (
                q(f"sum by (source) (rate(fleetp2p_fetched_bytes_total{{{NODE_SEL}}}[{RATE}]))", "{{source}}"),
                q(f"rate(fleetp2p_resumed_bytes_total{{{NODE_SEL}}}[{RATE}])", "kept after a restart"),
            ), unit="Bps", width=6, stacked=True),
            Panel("Tracker calls", (
                q(f"histogram_quantile(0.95, sum by (le, op) "
                  f"(rate(fleetp2p_tracker_request_seconds_bucket{{{NODE_SEL}}}[{RATE}])))", "{{op}} p95"),
            ), unit="s", width=6),
            Panel("Tracker call failures", (
                q(f"sum by (op) (rate(fleetp2p_tracker_errors_total{{{NODE_SEL}}}[{RATE}]))", "{{op}}"),
            ), unit="ops", width=6),
            Panel("Segments, lease waits, hedged reads", (
                q(f"sum by (source) (rate(fleetp2p_segments_fetched_total{{{NODE_SEL}}}[{RATE}]))",
                  "segments from {{source}}"),
                q(f"rate(fleetp2p_lease_waits_total{{{NODE_SEL}}}[{RATE}])", "lease waits"),
                q(f"sum by (winner) (rate(fleetp2p_read_hedges_total{{{NODE_SEL}}}[{RATE}]))",
                  "hedged first-piece reads won by {{winner}}"),
            ), unit="ops", width=6,
                description="A hedged read asked other downloaders too because the holder was slow."),
            Panel("Served to other nodes (HTTP range reads)", (
                q(f"rate(fleetp2p_peer_served_bytes_total{{{NODE_SEL}}}[{RATE}])", "bytes to peers"),
            ), unit="Bps", width=6),
            Panel("Lazy reads", (
                q(f"rate(fleetp2p_lazy_requested_bytes_total{{{NODE_SEL}}}[{RATE}])", "requested by clients"),
                q(f"sum by (source) (rate(fleetp2p_lazy_fetched_bytes_total{{{NODE_SEL}}}[{RATE}]))",
                  "fetched from {{source}}"),
            ), unit="Bps", width=6,
                description="Range reads of eStargz / zstd:chunked layers and the bytes fetched to answer them."),
            Panel("Lazy layers known", (
                q(f"fleetp2p_lazy_layers{{{NODE_SEL}}}", "layers"),
            ), width=6),
        )),
        Row("Store", (
            Panel("Store size", (
                q(f"fleetp2p_store_bytes{{{NODE_SEL}}}", "used"),
                q(f"fleetp2p_store_pinned_bytes{{{NODE_SEL}}}", "pinned"),
                q(f"fleetp2p_store_partial_bytes{{{NODE_SEL}}}", "interrupted downloads"),
                q(f"fleetp2p_store_limit_bytes{{{NODE_SEL}}}", "limit"),
            ), unit="bytes", width=6),
            Panel("Evicted bytes", (
                q(f"rate(fleetp2p_store_evicted_bytes_total{{{NODE_SEL}}}[{RATE}])", "bytes evicted"),
            ), unit="Bps", width=6),
            Panel("Evicted blobs", (
                q(f"rate(fleetp2p_store_evictions_total{{{NODE_SEL}}}[{RATE}])", "blobs evicted"),
            ), unit="ops", width=6),
            Panel("Verification and piece hash failures", (
                q(f"sum by (kind) (increase(fleetp2p_verification_failures_total{{{NODE_SEL}}}[{RATE}]))",
                  "{{kind}} digest mismatch"),
                q(f"increase(fleetp2p_piece_hash_failures_total{{{NODE_SEL}}}[{RATE}])", "piece hash failures"),
            ), width=6),
        )),
    ),
)

DASHBOARDS = (FLEET, TRACKER, NODE)


# --- Grafana JSON model ----------------------------------------------------------------------

def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    targets = [{"datasource": DATASOURCE, "expr": query.expr, "legendFormat": query.legend or "__auto",
                "range": True, "refId": chr(ord("A") + i)} for i, query in enumerate(panel.queries)]
    defaults: dict = {"unit": panel.unit, "color": {"mode": "palette-classic"}}
    if panel.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if panel.stacked else 0,
                              "showPoints": "never", "spanNulls": False,
                              "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"}}
        options: dict = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                         "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        defaults["color"] = {"mode": "thresholds"}
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "green", "value": None}]}
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "value", "graphMode": "none", "justifyMode": "auto",
                   "textMode": "auto", "orientation": "auto"}
    return {"id": panel_id, "type": panel.kind, "title": panel.title, "description": panel.description,
            "datasource": DATASOURCE, "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
            "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options,
            "targets": targets}


def _variable_json(variable: Variable) -> dict:
    return {"name": variable.name, "label": variable.label, "type": "query", "datasource": DATASOURCE,
            "query": variable.query, "definition": variable.query, "refresh": 2, "sort": 1,
            "includeAll": False, "multi": False, "hide": 0, "current": {}, "options": [], "regex": ""}


def render(dashboard: Dashboard) -> dict:
    """The Grafana dashboard JSON model (schema 39, Grafana 10+)."""
    panels: list[dict] = []
    panel_id = 0
    y = 0
    for row in dashboard.rows:
        panel_id += 1
        panels.append({"id": panel_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        y += 1
        x = 0
        line_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, line_height = 0, y + line_height, 0
            panel_id += 1
            panels.append(_panel_json(panel, panel_id, x, y))
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    templating = [{"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
                   "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [],
                   "refresh": 1, "regex": ""}]
    templating += [_variable_json(v) for v in dashboard.variables]
    return {"uid": dashboard.uid, "title": dashboard.title, "description": dashboard.description,
            "tags": ["fleetp2p"], "timezone": "", "editable": True, "graphTooltip": 1,
            "time": {"from": "now-6h", "to": "now"}, "refresh": "30s", "schemaVersion": 39,
            "version": 1, "links": [], "annotations": {"list": []},
            "templating": {"list": templating}, "panels": panels}


def dump(dashboard: Dashboard) -> str:
    return json.dumps(render(dashboard), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a JSON file differs from the code")
    args = parser.parse_args(argv)
    stale = []
    for dashboard in DASHBOARDS:
        path = HERE / dashboard.filename
        text = dump(dashboard)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"stale dashboards (run python {Path(__file__).name}): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
