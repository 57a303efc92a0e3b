"""Hot serving: a blob already in the agent's store, downloaded with curl,
against nginx (sendfile) and docker-registry serving the same bytes.

    python bench/hot_serve.py [--size 1GiB] [--runs 5] [--warmup 1] [--tracker embedded|none]

Every file is in the page cache while it is measured (the table shows it):
this compares the serving paths, not the disk. Runs go round-robin over the
servers so drift on the machine hits all of them alike. Targets: the agent
(default asyncio loop) reaches >= 0.9x nginx and >= 0.9x docker-registry.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common import (GB, Agent, BenchError, Nginx, Proc, Registry, Workspace, add_agent_flags,
                    code_version, human_bytes, median, parse_size, run_bench, table, verdict,
                    write_random_blob)
from measure import (MachineMonitor, Transfer, cached_fraction, curl_get, fmt_cached,
                     probe_drop_caches)

REPO = "bench/hot"
TARGET = 0.9


@dataclass
class Server:
    """One way of serving the blob, and what it measured."""

    name: str
    url: str
    file: Path  # the file it reads, for the page-cache column
    proc: Proc  # whose CPU time is counted
    agent: Agent | None = None
    transfers: list[Transfer] = field(default_factory=list)
    cached: list[float | None] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return median([t.gbps for t in self.transfers])

    def cpu_per_gb(self, client: bool = False) -> float:
        """Median CPU seconds per GB moved, of the server (or of curl)."""
        return median([(t.client_cpu if client else t.server_cpu or 0.0) / (t.size / GB)
                       for t in self.transfers])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"),
                        help="blob size (default 1GiB)")
    parser.add_argument("--runs", type=int, default=5,
                        help="timed downloads per server (default 5)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed downloads per server before timing (default 1)")
    add_agent_flags(parser)
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")
    return run_bench(lambda ws: bench(ws, args.size, args.runs, args.warmup, args.tracker))


def bench(ws: Workspace, size: int, runs: int, warmup: int, tracker: str | None) -> int:
    ws.require_free_space(4 * size)
    print(f"hot_serve: {human_bytes(size)} random blob, {runs} timed runs per server "
          f"(+{warmup} warm-up), curl on loopback, workspace {ws.root}")
    print(f"fleetp2p {code_version()}; agent {Agent.describe(tracker)}")
    print(f"drop_caches: {probe_drop_caches()}")
    machine = MachineMonitor(ws)

    registry = Registry(ws).start()
    source = ws.root / "blob"
    digest = write_random_blob(source, size)
    registry.push_blob(REPO, source, digest)
    source.unlink()  # the registry's copy is the reference from here on

    agents = [Agent(ws, registry, "agent-asyncio", "asyncio", tracker),
              Agent(ws, registry, "agent-uvloop", "uvloop", tracker)]
    fills = []
    for agent in agents:
        agent.start()
        fills.append(curl_get(agent.blob_url(REPO, digest), size))  # cold: fills the store
        if not agent.blob_path(digest).exists():
            raise BenchError(f"{agent.name}: blob not in its store after the first pull")
    print("store fill (cold pull through each agent, not part of the ratios): " + ", ".join(
        f"{a.event_loop} {t.gbps:.2f} GB/s" for a, t in zip(agents, fills)))

    # nginx needs one plain file; the agent's store may keep a blob as segment
    # files, so nginx serves a hard link of the registry's copy: the same bytes.
    nginx_root = ws.dir("nginx-root")
    nginx_file = nginx_root / digest.split(":", 1)[1]
    os.link(registry.blob_path(digest), nginx_file)
    nginx = Nginx(ws, nginx_root).start()
    servers = [
        Server("agent (asyncio)", agents[0].blob_url(REPO, digest), agents[0].blob_path(digest),
               agents[0].process, agents[0]),
        Server("agent (uvloop)", agents[1].blob_url(REPO, digest), agents[1].blob_path(digest),
               agents[1].process, agents[1]),
        Server("nginx sendfile", nginx.url(nginx_file.name), nginx_file, nginx.process),
        Server("docker-registry", registry.blob_url(REPO, digest), registry.blob_path(digest),
               registry.process),
    ]

    before = {a.name: (a.metric("fleetp2p_served_bytes_total", source="local"),
                       a.metric("fleetp2p_upstream_bytes_total")) for a in agents}
    for server in servers:
        for _ in range(warmup):
            curl_get(server.url, size)
    for _ in range(runs):
        for server in servers:
            server.cached.append(cached_fraction(server.file))
            server.transfers.append(curl_get(server.url, size, server.proc))

    # The hot numbers only count if the agents really served from their store.
    problems = []
    for agent in agents:
        local0, upstream0 = before[agent.name]
        local = agent.metric("fleetp2p_served_bytes_total", source="local") - local0
        upstream = agent.metric("fleetp2p_upstream_bytes_total") - upstream0
        expected = (warmup + runs) * size
        ok = local >= expected and upstream == 0
        print(f"metrics {agent.name}: served_bytes{{source=\"local\"}} +{local / GB:.2f} GB "
              f"(expected +{expected / GB:.2f}), upstream_bytes +{upstream:.0f}: "
              f"{'ok' if ok else 'NOT SERVED FROM THE STORE'}")
        if not ok:
            problems.append(agent.name)

    print()
    print(table(
        ["server", "GB/s median", "min", "max", "TTFB median", "server CPU s/GB",
         "curl CPU s/GB", "page cache before runs"],
        [[s.name, f"{s.gbps:.2f}", f"{min(t.gbps for t in s.transfers):.2f}",
          f"{max(t.gbps for t in s.transfers):.2f}",
          f"{median([t.ttfb for t in s.transfers]) * 1000:.1f} ms",
          f"{s.cpu_per_gb():.2f}", f"{s.cpu_per_gb(client=True):.2f}",
          ", ".join(fmt_cached(c) for c in s.cached)] for s in servers]))
    print()

    by_name = {s.name: s for s in servers}
    nginx_gbps, registry_gbps = by_name["nginx sendfile"].gbps, by_name["docker-registry"].gbps
    parts = []
    for s in servers[:2]:
        to_nginx, to_registry = s.gbps / nginx_gbps, s.gbps / registry_gbps
        loop = s.agent.event_loop if s.agent else s.name
        parts.append(f"{loop}: agent/nginx={to_nginx:.2f} agent/registry={to_registry:.2f} "
                     f"({verdict(to_nginx >= TARGET and to_registry >= TARGET)})")
    print(machine.report())
    print(f"ratios (target >= {TARGET} both; asyncio is the default loop): " + "; ".join(parts))
    if problems:
        print(f"error: {', '.join(problems)} did not serve from the local store", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
