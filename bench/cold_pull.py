"""Cold pulls: a blob the agent does not have, streamed through it from
docker-registry, against the same GET made straight to the registry; then the
agent's memory while it streams a large blob cold and serves it hot.

    python bench/cold_pull.py [--size 1GiB] [--runs 3] [--rss-size 4GiB] [--evict-upstream]
                              [--upstream-rate 1gbit] [--tracker embedded|none]

Part (a), per run: a direct GET, then a fresh agent (empty data dir, started
before the clock runs) and the same GET through it. By default the registry's
blob file is in the page cache for both, so the ratio shows what the agent
adds (its disk write, hash and fsync included); --evict-upstream drops it
before every GET instead. On loopback the registry answers at memory speed,
so the ratio then measures CPU per byte; --upstream-rate puts a rate-limited
relay (bench/throttle.py) in front of the registry for both GETs, as a link
would. Targets: agent_time/direct_time <= 1.1, the agent's time to first
byte < 0.2 s.

Part (b): peak VmRSS of the agent (sampled every 50 ms, plus the kernel's
VmHWM) while a --rss-size blob streams through it cold, then hot. Target:
cold peak < 150 MB.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from common import (GB, MB, Agent, BenchError, Registry, Throttle, Workspace, add_agent_flags,
                    code_version, human_bytes, median, parse_rate, parse_size, run_bench, table,
                    verdict, write_random_blob)
from measure import (MachineMonitor, RssSampler, Transfer, cached_fraction, curl_get,
                     evict_page_cache, fmt_cached, probe_drop_caches, rss_bytes, warm_page_cache)

REPO = "bench/cold"
RATIO_TARGET = 1.1
TTFB_TARGET = 0.2
RSS_TARGET = 150 * MB


@dataclass
class ColdRun:
    direct: Transfer
    agent: Transfer
    agent_first_body: float  # the agent's own histogram: request → first body byte sent
    upstream_cached: list[float | None]  # registry file in page cache before each GET


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"),
                        help="blob size for the cold-pull ratio (default 1GiB)")
    parser.add_argument("--runs", type=int, default=3, help="cold pulls each way (default 3)")
    parser.add_argument("--rss-size", type=parse_size, default=parse_size("4GiB"),
                        help="blob size for the memory part (default 4GiB)")
    parser.add_argument("--evict-upstream", action="store_true",
                        help="drop the registry's blob file from the page cache before every GET")
    parser.add_argument("--upstream-rate", type=parse_rate, default=None, metavar="RATE",
                        help="limit registry -> client bytes in part (a) to RATE (1gbit, 100MB); "
                        "default: unlimited")
    add_agent_flags(parser)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    return run_bench(lambda ws: bench(ws, args))


def bench(ws: Workspace, args: argparse.Namespace) -> int:
    # at most: the pushed blob, its registry copy and one agent copy, per part
    ws.require_free_space(3 * max(args.size, args.rss_size))
    print(f"cold_pull: {human_bytes(args.size)} blob x {args.runs} runs, memory part with "
          f"{human_bytes(args.rss_size)}, curl on loopback, workspace {ws.root}")
    print(f"fleetp2p {code_version()}; agent {Agent.describe(args.tracker)}")
    print(f"drop_caches: {probe_drop_caches()}")
    print("upstream page cache: " + (
        "evicted before every GET (fadvise DONTNEED)" if args.evict_upstream else
        "warm for every GET (the ratio isolates the agent's own cost)"))
    print("upstream link (part a): " + (
        f"{args.upstream_rate * 8 / 1e9:.2f} Gbit/s relay in front of the registry, both ways of "
        "fetching" if args.upstream_rate else "unlimited loopback"))
    machine = MachineMonitor(ws)
    registry = Registry(ws).start()
    throttle = Throttle(ws, registry, args.upstream_rate).start() if args.upstream_rate else None
    ratio_ok = cold_ratio(ws, registry, throttle, args)
    print()
    rss_ok = memory(ws, registry, args.rss_size, args.evict_upstream, args.tracker)
    print()
    print(machine.report())
    print(f"summary: {ratio_ok}; {rss_ok}")
    return 0


def cpu_per_gb(transfer: Transfer) -> float:
    return (transfer.server_cpu or 0.0) / (transfer.size / GB)


def push(ws: Workspace, registry: Registry, size: int) -> str:
    """A fresh random blob in the registry; the local source is deleted at once."""
    started = time.monotonic()
    source = ws.root / "blob"
    digest = write_random_blob(source, size)
    written = time.monotonic()
    registry.push_blob(REPO, source, digest)
    source.unlink()
    print(f"({human_bytes(size)} blob: written in {written - started:.1f} s, pushed in "
          f"{time.monotonic() - written:.1f} s)")
    return digest


def prepare_upstream(registry: Registry, digest: str, evict: bool) -> float | None:
    path = registry.blob_path(digest)
    if evict:
        evict_page_cache(path)
    else:
        warm_page_cache(path)
    return cached_fraction(path)


def cold_ratio(ws: Workspace, registry: Registry, throttle: Throttle | None,
               args: argparse.Namespace) -> str:
    size, evict = args.size, args.evict_upstream
    digest = push(ws, registry, size)
    direct_url = (throttle or registry).blob_url(REPO, digest)
    results: list[ColdRun] = []
    for run in range(1, args.runs + 1):
        cached = [prepare_upstream(registry, digest, evict)]
        direct = curl_get(direct_url, size, registry.process)
        agent = Agent(ws, registry, f"agent-cold-{run}", tracker=args.tracker,
                      upstream=throttle.host if throttle else None).start()
        try:
            cached.append(prepare_upstream(registry, digest, evict))
            through = curl_get(agent.blob_url(REPO, digest), size, agent.process)
            count = agent.metric("fleetp2p_time_to_first_byte_seconds_count", source="upstream")
            total = agent.metric("fleetp2p_time_to_first_byte_seconds_sum", source="upstream")
            upstream = agent.metric("fleetp2p_upstream_bytes_total", kind="blob")
            if count != 1 or upstream < size:
                raise BenchError(f"run {run}: the agent did not stream from upstream "
                                 f"(ttfb samples {count}, upstream bytes {upstream:.0f})")
        finally:
            agent.remove()
        results.append(ColdRun(direct, through, total, cached))

    print(table(
        ["run", "direct s", "direct GB/s", "direct TTFB", "registry CPU s/GB", "agent s",
         "agent GB/s", "agent TTFB (curl)", "agent 1st body byte", "agent CPU s/GB",
         "upstream in page cache"],
        [[str(i), f"{r.direct.total:.2f}", f"{r.direct.gbps:.2f}", f"{r.direct.ttfb * 1000:.1f} ms",
          f"{cpu_per_gb(r.direct):.2f}", f"{r.agent.total:.2f}", f"{r.agent.gbps:.2f}",
          f"{r.agent.ttfb * 1000:.1f} ms", f"{r.agent_first_body * 1000:.1f} ms",
          f"{cpu_per_gb(r.agent):.2f}", "/".join(fmt_cached(c) for c in r.upstream_cached)]
         for i, r in enumerate(results, 1)]))
    ratio = median([r.agent.total for r in results]) / median([r.direct.total for r in results])
    ttfb = median([r.agent.ttfb for r in results])
    worst_ttfb = max(max(r.agent.ttfb, r.agent_first_body) for r in results)
    line = (f"agent_time/direct_time={ratio:.2f} ({verdict(ratio <= RATIO_TARGET)}, "
            f"<= {RATIO_TARGET}); "
            f"agent TTFB median={ttfb * 1000:.0f} ms, worst incl. first body byte="
            f"{worst_ttfb * 1000:.0f} ms ({verdict(worst_ttfb < TTFB_TARGET)}, < {TTFB_TARGET} s)")
    print(f"ratios: {line}")
    return line


def memory(ws: Workspace, registry: Registry, size: int, evict: bool, tracker: str | None) -> str:
    digest = push(ws, registry, size)
    prepare_upstream(registry, digest, evict)
    agent = Agent(ws, registry, "agent-rss", tracker=tracker).start()
    try:
        idle = rss_bytes(agent.pid) or 0
        with RssSampler(agent.pid) as cold_rss:
            cold = curl_get(agent.blob_url(REPO, digest), size, agent.process)
        stored_cached = cached_fraction(agent.blob_path(digest))
        with RssSampler(agent.pid) as hot_rss:
            hot = curl_get(agent.blob_url(REPO, digest), size, agent.process)
        local = agent.metric("fleetp2p_served_bytes_total", source="local")
        if local < size:
            raise BenchError(f"the hot GET was not served from the store ({local:.0f} local bytes)")
    finally:
        agent.remove()

    def hwm(sampler: RssSampler) -> str:
        return "n/a" if sampler.hwm is None else f"{sampler.hwm / MB:.1f} MB"

    def split(sampler: RssSampler) -> str:
        return f"{sampler.peak_anon / MB:.0f}/{sampler.peak_file / MB:.0f} MB"

    print(f"agent RSS while streaming {human_bytes(size)} (idle after start: {idle / MB:.1f} MB):")
    print(table(
        ["phase", "GB/s", "seconds", "agent CPU s/GB", "peak VmRSS (50 ms samples)",
         "of it anon/file", "samples", "VmHWM (kernel peak)", "store in page cache after"],
        [["cold (through from upstream)", f"{cold.gbps:.2f}", f"{cold.total:.2f}",
          f"{cpu_per_gb(cold):.2f}", f"{cold_rss.peak / MB:.1f} MB", split(cold_rss),
          str(cold_rss.samples), hwm(cold_rss), fmt_cached(stored_cached)],
         ["hot (from the store)", f"{hot.gbps:.2f}", f"{hot.total:.2f}", f"{cpu_per_gb(hot):.2f}",
          f"{hot_rss.peak / MB:.1f} MB", split(hot_rss), str(hot_rss.samples), hwm(hot_rss),
          "-"]]))
    cold_peak = max(cold_rss.peak, cold_rss.hwm or 0)
    hot_peak = max(hot_rss.peak, hot_rss.hwm or 0)
    line = (f"cold peak RSS={cold_peak / MB:.0f} MB ({verdict(cold_peak < RSS_TARGET)}, "
            f"< {RSS_TARGET / MB:.0f} MB), hot peak RSS={hot_peak / MB:.0f} MB")
    print(f"memory: {line}")
    return line


if __name__ == "__main__":
    sys.exit(main())
