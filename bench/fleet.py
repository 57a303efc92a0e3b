"""A fleet pulling one blob: N agents, a tracker and the upstream registry, each
on its own network namespace with a shaped link (tests/fleet/netns.py).

    python bench/fleet.py [--nodes 16] [--size 256MiB] [--link 100mbit] [--upstream-rate RATE]
                          [--segment-size 32MiB] [--piece-size 128KiB] [--phases warm,cold,baseline]
                          [--mtu 1500] [--trace SECONDS] [-v]

Phases (each with fresh agents, empty stores and a fresh tracker):
  warm      node1 pulls the blob alone first; then the other N-1 pull it at once
  cold      all N pull a blob nobody has, at the same moment
  baseline  P2P off (`tracker = "none"`): all N pull at once, each from upstream

For each phase: the time until the last node's client holds a verified copy
(the client hashes the body it received), divided by the physical lower
bound — B/L for a node to receive B over its link, B/U for the cold phase
where the upstream must send B at least once — and the blob bytes that left
the upstream (its access log) divided by B. Warm also reports time to first
byte from a peer (client-measured, median and max over nodes).
Targets: warm <= 1.3, cold <= 1.6, upstream <= 1.05 x B, peer TTFB < 0.3 s.

Every link has MTU 1500 by default. All hosts share this machine's cores, so
the kernel's per-packet work for every host (veth, bridge, tbf, TCP) competes
with the agents for the same CPUs (tests/fleet/netns.py keeps that work as
small, and the wire as clean, as real NICs and switches would: GRO on, no
iptables on the bridge, a tbf bucket that takes whole offload frames):
16 nodes at 100 Mbit/s keep 2 cores about 95 % busy, and the ratios are then
bound by CPU, not by the links. `--mtu 9000`
(jumbo frames, common in data centres) carries the same bytes in fewer, larger
packets; comparing the two runs shows how much of a ratio is the simulation.

Needs root (network namespaces). Everything it starts — namespaces, processes,
temp dirs — is removed on exit, Ctrl-C or SIGTERM; namespaces left by a killed
run are removed at the next start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
# tests/ first: `fleet` must be tests/fleet (the package), not this script.
sys.path.insert(0, str(REPO_ROOT / "tests"))

from common import (human_bytes, interrupt_on_sigterm, parse_size, print_machine,  # noqa: E402
                    table)

from fleet.netns import MAX_MTU, MIN_MTU, Network, network, rate_bits  # noqa: E402
from harness.agent import metric_sum  # noqa: E402
from fleet.pull import QUARTERS, PullResult, blob_path, pull_all  # noqa: E402
from fleet.scene import Scene  # noqa: E402
from fleet.services import BlobFile, UpstreamRegistry, write_random_blob  # noqa: E402

WARM_TARGET = 1.3
COLD_TARGET = 1.6
UPSTREAM_TARGET = 1.05
TTFB_TARGET = 0.3
REPO = "bench/fleet"


@dataclass
class Phase:
    name: str
    digest: str
    size: int
    results: list[PullResult]
    start_at: float
    bound_s: float
    bound_name: str
    upstream_bytes: int
    cpu_busy: float
    agents_cpu: float

    @property
    def verified(self) -> int:
        return sum(1 for r in self.results if r.verified(self.digest, self.size))

    @property
    def last_done_s(self) -> float:
        return max((r.done_at or float("inf")) for r in self.results) - self.start_at


class CpuMeter:
    """How busy the machine was between start and `read()`, and how much of that
    the agents themselves used: a 2-core machine running 16 agents is CPU-bound,
    and other work on the machine skews every ratio."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._idle, self._total = self._machine()
        self._agents = self._agent_ticks()
        self._wall = time.monotonic()

    @staticmethod
    def _machine() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)

    def _agent_ticks(self) -> int:
        ticks = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, IndexError, ValueError):
                continue
        return ticks

    def read(self) -> tuple[float, float]:
        """(machine busy fraction, agents' share of the machine) since start."""
        idle, total = self._machine()
        cores = os.cpu_count() or 1
        agents_s = (self._agent_ticks() - self._agents) / os.sysconf("SC_CLK_TCK")
        wall = max(1e-6, time.monotonic() - self._wall)
        return 1 - (idle - self._idle) / max(1, total - self._total), agents_s / wall / cores


class LinkTrace:
    """Every node's link use over time (`--trace`): which links sit idle is what
    tells a slow swarm from a slow machine. Sampled from the bridge ports'
    counters, so it costs the fleet nothing."""

    def __init__(self, net: Network, interval: float) -> None:
        self.net, self.interval = net, interval
        self.rows: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "LinkTrace":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> dict[str, tuple[int, int]]:
        """host → (bytes the host sent, bytes it received)."""
        ports = {h.bridge_port: name for name, h in self.net.hosts.items()}
        out = self.net.bridge_run("ip", "-j", "-s", "link", "show").stdout
        counters = {}
        for link in json.loads(out):
            name = ports.get(link.get("ifname", "").split("@")[0])
            if name is not None:
                stats = link["stats64"]
                counters[name] = (stats["rx"]["bytes"], stats["tx"]["bytes"])
        return counters

    def _run(self) -> None:
        while not self._stop.is_set():
            self.rows.append((time.monotonic(), self._sample()))
            self._stop.wait(self.interval)

    def report(self, names: Sequence[str]) -> str:
        """Mbit/s sent/received per host and interval; then each host's totals in
        MiB (link bytes, headers included: what a swarm sent twice shows there)."""
        def cells(a: dict, b: dict, scale: float) -> str:
            out = []
            for n in names:
                (s0, r0), (s1, r1) = a.get(n, (0, 0)), b.get(n, (0, 0))
                out.append(f"{(s1 - s0) * scale:5.0f}/{(r1 - r0) * scale:<5.0f}")
            return " ".join(out)

        lines = ["  t(s)  " + " ".join(f"{n[-7:]:>11}" for n in names)]
        for (t0, a), (t1, b) in zip(self.rows, self.rows[1:]):
            lines.append(f"{t1 - self.rows[0][0]:6.1f}  " + cells(a, b, 8e-6 / max(1e-6, t1 - t0)))
        if len(self.rows) > 1:
            lines.append("   MiB  " + cells(self.rows[0][1], self.rows[-1][1], 2.0 ** -20))
        return "\n".join(lines)


def run_phase(name: str, scene: Scene, blob: BlobFile, args: argparse.Namespace,
              bound_s: float, bound_name: str) -> Phase:
    nodes = scene.nodes
    tracker = "none" if name == "baseline" else scene.tracker(lease_ttl=args.lease_ttl,
                                                                  lease_limit=args.lease_limit,
                                                                  log_level="info").url
    settings = {"log_level": "info"}
    for key in ("segment_size", "piece_size"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.peer_stall_timeout is not None:
        settings["peer_stall_timeout"] = args.peer_stall_timeout
    agents = scene.start_agents(nodes, tracker, **settings)
    path = blob_path(blob.repo, blob.digest)
    timeout = max(300.0, 4 * len(nodes) * blob.size * 8 / rate_bits(args.upstream_rate))
    pulling = [a.host for a in agents]
    if name == "warm":
        seeded = pull_all(pulling[:1], path, timeout=timeout)
        if not seeded[0].verified(blob.digest, blob.size):
            raise RuntimeError(f"seeding node1 failed: {seeded[0]}")
        print(f"  node1 seeded in {seeded[0].done_s:.1f} s", flush=True)
        pulling = pulling[1:]
    mark = scene.upstream.access_log.mark()
    cpu = CpuMeter([a.process.pid for a in agents if a.process is not None])
    start_at = time.time() + 1.0 + 0.05 * len(pulling)  # every client interpreter is up by then
    with LinkTrace(scene.net, args.trace or 3600.0) as trace:
        results = pull_all(pulling, path, delay=start_at - time.time(), timeout=timeout)
    if args.trace:
        print("  link use, Mbit/s sent/received:")
        print(trace.report(["registry", "tracker", *(h.name for h in nodes)]))
    busy, agents_cpu = cpu.read()
    sent = scene.upstream.blob_bytes(mark, {blob.digest})
    phase = Phase(name, blob.digest, blob.size, results, start_at, bound_s, bound_name, sent, busy,
                  agents_cpu)
    if args.verbose:
        fleet_bytes(agents)
        for a in agents:
            lines = a.log(400_000).splitlines()
            for kind in ("no progress", "no holder", "peer http", "Traceback", "ERROR"):
                notes = [line for line in lines if kind in line]
                if notes:
                    print(f"  {a.host.name}: {len(notes)} × {kind!r}, e.g. {notes[0][:240]}")
            if any("Traceback" in line for line in lines):  # the first one in full
                first = next(i for i, line in enumerate(lines) if "Traceback" in line)
                print("\n".join(f"    {line}" for line in lines[first - 1:first + 40]))
    return phase


def fleet_bytes(agents: Sequence) -> None:
    """Which paths the blob's bytes took: BitTorrent, or a holder's HTTP answers
    (first pieces, stripes of a fresh segment), or upstream."""
    metrics = [a.metrics() for a in agents if a.alive()]
    mib = lambda name, **labels: sum(metric_sum(m, name, **labels) for m in metrics) / (1 << 20)  # noqa: E731
    print(f"  fleet received {mib('fleetp2p_fetched_bytes_total', source='peer'):.0f} MiB from peers "
          f"({mib('fleetp2p_peer_served_bytes_total'):.0f} MiB of them over HTTP) and "
          f"{mib('fleetp2p_fetched_bytes_total', source='upstream'):.0f} MiB from upstream")


def report(phases: Sequence[Phase], args: argparse.Namespace, size: int) -> int:
    rows = []
    for p in phases:
        ratio = p.last_done_s / p.bound_s
        target = {"warm": WARM_TARGET, "cold": COLD_TARGET}.get(p.name)
        up = p.upstream_bytes / size
        up_target = UPSTREAM_TARGET if p.name in ("warm", "cold") else None
        rows.append([p.name, f"{len(p.results)}", f"{p.verified}/{len(p.results)}",
                     f"{p.last_done_s:.1f}", f"{p.bound_name}={p.bound_s:.1f}",
                     f"{ratio:.2f}" + (f" (<= {target}: {'ok' if ratio <= target else 'MISSED'})"
                                       if target else ""),
                     f"{up:.2f}" + (f" (<= {up_target}: {'ok' if up <= up_target else 'MISSED'})"
                                    if up_target else ""),
                     f"{p.cpu_busy:.0%} ({p.agents_cpu:.0%} agents)"])
    print()
    print(table(["phase", "clients", "verified", "last done s", "bound s", "time/bound",
                 "upstream/B", "machine cpu busy"], rows))
    warm = next((p for p in phases if p.name == "warm"), None)
    if warm is not None:
        ttfb = [r.first_byte_s for r in warm.results if r.first_byte_s is not None]
        if ttfb:
            med, worst = statistics.median(ttfb), max(ttfb)
            print(f"\nwarm time to first byte from a peer: median {med:.3f} s, max {worst:.3f} s "
                  f"(target < {TTFB_TARGET}: median {'ok' if med < TTFB_TARGET else 'MISSED'}, "
                  f"max {'ok' if worst < TTFB_TARGET else 'MISSED'})")
            headers = [r.headers_s for r in warm.results if r.headers_s is not None]
            print(f"  (of which headers: median {statistics.median(headers):.3f} s, "
                  f"max {max(headers):.3f} s); every node: "
                  + " ".join(f"{t:.2f}" for t in sorted(ttfb)))
    for p in phases:
        done = sorted(r.done_at - p.start_at for r in p.results if r.done_at is not None)
        if done:
            print(f"{p.name}: clients done after {done[0]:.1f} s (first), "
                  f"{statistics.median(done):.1f} s (median), {done[-1]:.1f} s (last)")
        quarters = [r.quarters_s for r in p.results if len(r.quarters_s) == QUARTERS - 1]
        if quarters:
            medians = [statistics.median(q[k] for q in quarters) for k in range(QUARTERS - 1)]
            print("  in-order stream: a quarter, half, three quarters of the blob after "
                  + ", ".join(f"{m:.1f}" for m in medians) + " s (median client)")
    for p in phases:
        bad = [r for r in p.results if not r.verified(p.digest, p.size)]
        for r in bad:
            print(f"{p.name}: {r.host} has no verified copy: status {r.status}, {r.bytes} bytes, "
                  f"error {r.error}")
    return 0 if all(p.verified == len(p.results) for p in phases) else 1


def build(net: Network, args: argparse.Namespace) -> UpstreamRegistry:
    net.add_host("registry", args.upstream_rate, octet=2)
    net.add_host("tracker", args.link, octet=3)
    for i in range(1, args.nodes + 1):
        net.add_host(f"node{i}", args.link, octet=10 + i)
    return UpstreamRegistry(net["registry"], net.workdir / "registry").start()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--size", type=parse_size, default=parse_size("256MiB"), help="blob size B")
    parser.add_argument("--link", default="100mbit", help="every node's link rate L (tc syntax)")
    parser.add_argument("--upstream-rate", default=None, help="the registry's link rate U (default L)")
    parser.add_argument("--segment-size", default=None, help="agent setting (default: the agent's own)")
    parser.add_argument("--piece-size", default=None, help="agent setting (default: the agent's own)")
    parser.add_argument("--peer-stall-timeout", type=float, default=None,
                        help="agent setting (default: the agent's own)")
    parser.add_argument("--lease-ttl", type=float, default=15.0, help="tracker lease seconds")
    parser.add_argument("--lease-limit", type=int, default=None,
                        help="tracker setting: leases per blob at once (default: the tracker's own)")
    parser.add_argument("--phases", default="warm,cold,baseline")
    parser.add_argument("--mtu", type=int, default=1500, help="every link's MTU")
    parser.add_argument("--trace", type=float, default=0.0, metavar="SECONDS",
                        help="print every link's use at this interval")
    parser.add_argument("-v", "--verbose", action="store_true", help="show agents' stall patches and errors")
    args = parser.parse_args(argv)
    args.upstream_rate = args.upstream_rate or args.link
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - {"warm", "cold", "baseline"}
    if unknown or args.nodes < 2 or args.nodes > 200:
        parser.error(f"bad --phases {sorted(unknown)} or --nodes (2..200)")
    if not MIN_MTU <= args.mtu <= MAX_MTU:
        parser.error(f"--mtu {args.mtu}: expected {MIN_MTU}..{MAX_MTU}")
    link_s = args.size * 8 / rate_bits(args.link)
    up_s = args.size * 8 / rate_bits(args.upstream_rate)
    interrupt_on_sigterm()
    print_machine("ratios will be pessimistic")
    print(f"fleet: {args.nodes} nodes, B = {human_bytes(args.size)}, L = {args.link}, "
          f"U = {args.upstream_rate}, MTU {args.mtu}; B/L = {link_s:.1f} s, B/U = {up_s:.1f} s; segments "
          f"{args.segment_size or 'default'}, pieces {args.piece_size or 'default'}", flush=True)
    done: list[Phase] = []
    try:
        with network(mtu=args.mtu) as net:
            upstream = build(net, args)
            source = net.workdir / "blob"
            write_random_blob(source, args.size)
            blob = upstream.push_blob(source, REPO)
            source.unlink()
            for name in phases:
                print(f"phase {name} …", flush=True)
                scene = Scene(net, upstream, net.workdir / f"scene-{name}")
                try:
                    bound, bound_name = (up_s, "B/U") if name == "cold" else (link_s, "B/L")
                    done.append(run_phase(name, scene, blob, args, bound, bound_name))
                    p = done[-1]
                    print(f"  last verified copy after {p.last_done_s:.1f} s "
                          f"({p.last_done_s / p.bound_s:.2f} x {p.bound_name}); upstream "
                          f"{p.upstream_bytes / args.size:.2f} x B", flush=True)
                except Exception:
                    print(scene.report()[-20000:], file=sys.stderr)
                    raise
                finally:
                    scene.close()
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    return report(done, args, args.size)


if __name__ == "__main__":
    sys.exit(main())
