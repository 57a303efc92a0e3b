"""A fleet on one machine: agents on their own hosts (network namespaces, shaped
links), a standalone tracker, the upstream registry on its own host.

Every client body is hashed by the client itself, so "verified" means the
bytes a client received hash to the digest. Upstream bytes are counted from
the registry's access log (what actually left the upstream) and from the
agents' `fleetp2p_upstream_bytes_total{kind="blob"}`.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Callable, Sequence

import pytest

from fleetp2p.peering.handouts import ROUND_QUIET
from fleetp2p.store.pagecache import RELEASE_DELAY
from harness.containerd import start_containerd, write_hosts_dir
from harness.images import build_image
from harness.pagecache import resident_bytes, segment_files

from .agents import FleetAgent, Snapshot
from .pull import PullResult, blob_path, pull_all, start_pulls
from .scene import Scene
from .services import BlobFile

pytestmark = pytest.mark.slow

MiB = 1 << 20
BlobMaker = Callable[[str, int], BlobFile]


def _table(results: Sequence[PullResult]) -> str:
    rows = [f"{'host':8} {'status':>6} {'headers':>8} {'1st byte':>8} {'done':>8} {'MiB':>7}  error"]
    for r in results:
        def s(v: float | None) -> str:
            return f"{v:8.3f}" if v is not None else f"{'-':>8}"
        rows.append(f"{r.host:8} {str(r.status):>6} {s(r.headers_s)} {s(r.first_byte_s)} "
                    f"{s(r.done_s)} {r.bytes / MiB:7.1f}  {r.error or ''}")
    return "\n".join(rows)


def assert_verified(results: Sequence[PullResult], blob: BlobFile) -> None:
    print(_table(results))
    bad = [r for r in results if not r.verified(blob.digest, blob.size)]
    assert not bad, f"clients without a verified copy of {blob.digest}:\n{_table(bad)}"


def total(snaps: Sequence[Snapshot], field: str, key: str | None = None) -> float:
    return sum((getattr(s, field)[key] if key else getattr(s, field)) for s in snaps)


def wait_first(agents: Sequence[FleetAgent], value: Callable[[Snapshot], float], threshold: float,
               timeout: float) -> FleetAgent | None:
    """The first agent whose snapshot `value` reaches `threshold` (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for a in agents:
            try:
                if value(Snapshot.of(a)) >= threshold:
                    return a
            except (OSError, RuntimeError):
                continue  # a busy agent may miss one scrape
        time.sleep(0.05)
    return None




def test_warm_fleet_takes_nothing_from_upstream(scene: Scene, blob: BlobMaker) -> None:
    """One node pulled the blob first; eight pull it at once, all from peers."""
    b = blob("warm", 256 * MiB)
    tracker = scene.tracker()
    seed, *rest = scene.start_agents(scene.nodes[:9], tracker.url, segment_size="32MiB")
    assert_verified(pull_all([seed.host], blob_path(b.repo, b.digest)), b)

    mark = scene.upstream.access_log.mark()
    before = scene.snapshots(rest)
    results = pull_all([a.host for a in rest], blob_path(b.repo, b.digest), timeout=180)
    assert_verified(results, b)

    after = scene.snapshots(rest)
    for a, snap in zip(rest, after):
        assert snap.served["peer"] == b.size, f"{a.host.name} served {snap.served}"
    sent = scene.upstream.blob_bytes(mark, {b.digest})
    counted = total(after, "upstream_blob_bytes") - total(before, "upstream_blob_bytes")
    assert sent == counted == 0, f"warm pull took {sent / b.size:.2f}x the blob from upstream"

    # each node handed its page cache back once its verifying hash had passed a segment
    time.sleep(RELEASE_DELAY + 1.0)
    resident = [resident_bytes(segment_files(a.blob_dir(b.digest))) for a in rest]
    print("MiB still in the page cache:", [round(r / MiB, 1) for r in resident])
    assert sum(resident) < 0.25 * len(rest) * b.size, "the nodes kept the blob in memory"


def test_cold_herd_costs_one_upstream_copy(scene: Scene, blob: BlobMaker) -> None:
    """Eight nodes ask for a blob nobody has at the same moment."""
    b = blob("cold", 128 * MiB)
    tracker = scene.tracker()
    agents = scene.start_agents(scene.nodes[:8], tracker.url, segment_size="16MiB")
    mark = scene.upstream.access_log.mark()
    results = pull_all([a.host for a in agents], blob_path(b.repo, b.digest), timeout=180)
    assert_verified(results, b)

    sent = scene.upstream.blob_bytes(mark, {b.digest})
    snaps = scene.snapshots(agents)
    print(f"upstream sent {sent / b.size:.3f}x the blob; agents counted "
          f"{total(snaps, 'upstream_blob_bytes') / b.size:.3f}x; segments by source: "
          f"upstream {total(snaps, 'segments', 'upstream'):.0f}, peer {total(snaps, 'segments', 'peer'):.0f}")
    slow = [r for r in results if r.headers_s is None or r.headers_s >= 1.0]
    assert not slow, f"clients waited >= 1 s for headers:\n{_table(slow)}"
    assert sent <= 1.05 * b.size, f"cold herd took {sent / b.size:.2f}x the blob from upstream"


def test_lease_holder_killed_midway(scene: Scene, blob: BlobMaker) -> None:
    """A one-segment blob has exactly one lease holder; kill -9 it half-way through
    its upstream fetch. Its lease expires (tracker TTL 2 s), another node takes it,
    and every other node still ends with a verified copy."""
    b = blob("lease", 64 * MiB)
    scene.set_rate([scene.net["registry"]], "200mbit")  # ~2.8 s for the segment
    tracker = scene.tracker(lease_ttl=2.0)
    agents = scene.start_agents(scene.nodes[:5], tracker.url, segment_size="64MiB",
                                adaptive_segments=False)
    mark = scene.upstream.access_log.mark()
    _, pulls = start_pulls([a.host for a in agents], blob_path(b.repo, b.digest), timeout=120)

    holder = wait_first(agents, lambda s: s.upstream_blob_bytes, b.size // 2, timeout=30)
    assert holder is not None, "no node fetched from upstream"
    assert Snapshot.of(holder).upstream_blob_bytes < b.size, "too late: the holder already finished"
    holder.kill9()
    print(f"killed lease holder {holder.host.name}")

    survivors = [(a, p) for a, p in zip(agents, pulls) if a is not holder]
    assert_verified([p.result(120) for _, p in survivors], b)
    snaps = scene.snapshots([a for a, _ in survivors])
    refetchers = [a.host.name for (a, _), s in zip(survivors, snaps) if s.segments["upstream"] == 1]
    assert len(refetchers) == 1, f"expected one new lease holder, got {refetchers}"
    assert all(s.segments["upstream"] + s.segments["peer"] == 1 for s in snaps)
    assert total(snaps, "lease_waits") >= 1
    sent = scene.upstream.blob_bytes(mark, {b.digest})
    print(f"new holder {refetchers[0]}; upstream sent {sent / b.size:.2f}x the blob")
    assert sent <= 2 * b.size


def test_serving_peer_killed_midway(scene: Scene, blob: BlobMaker) -> None:
    """The only seed dies while six nodes are swarming from it: they finish from
    each other and, for pieces nobody got, from upstream after the stall timeout."""
    b = blob("peerkill", 128 * MiB)
    tracker = scene.tracker()
    seed, *rest = scene.start_agents(scene.nodes[:7], tracker.url, segment_size="16MiB",
                                     piece_size="256KiB", peer_stall_timeout=3.0)
    assert_verified(pull_all([seed.host], blob_path(b.repo, b.digest)), b)
    scene.set_rate([a.host for a in rest], "400mbit")
    mark = scene.upstream.access_log.mark()
    _, pulls = start_pulls([a.host for a in rest], blob_path(b.repo, b.digest), timeout=120)

    first = wait_first(rest, lambda s: s.served["peer"], b.size * 0.3, timeout=60)
    assert first is not None, "no node received anything from the seed"
    progress = {a.host.name: Snapshot.of(a).served["peer"] for a in rest}
    seed.kill9()
    print(f"killed the seed with receivers at {[f'{v / b.size:.0%}' for v in progress.values()]}")
    assert any(v < b.size for v in progress.values()), "too late: every receiver had finished"

    assert_verified([p.result(120) for p in pulls], b)
    sent = scene.upstream.blob_bytes(mark, {b.digest})
    print(f"upstream sent {sent / b.size:.2f}x the blob after the seed died")


def test_a_busy_holder_gets_first_piece_reads_hedged(scene: Scene, blob: BlobMaker) -> None:
    """The only holder sits on a 10 Mbit/s link, busy sending stripes to three
    early downloaders, when three more ask for their first piece: it answers
    late, so they ask other downloaders too (the early ones have that piece).
    Everyone still gets a verified copy, none of it from upstream.

    The late nodes start once the holder has sent a few pieces over HTTP, well
    before any early node holds a whole segment (4 MiB leave a 10 Mbit/s link
    in 3.4 s): an early holder on a fast link would answer before the hedge."""
    b = blob("hedge", 8 * MiB)
    tracker = scene.tracker()
    seed, *rest = scene.start_agents(scene.nodes[:7], tracker.url)
    assert_verified(pull_all([seed.host], blob_path(b.repo, b.digest)), b)
    scene.set_rate([seed.host], "10mbit")
    early, late = rest[:3], rest[3:]
    mark = scene.upstream.access_log.mark()
    _, pulls = start_pulls([a.host for a in early], blob_path(b.repo, b.digest), timeout=120)
    started = wait_first([seed], lambda s: s.peer_served, 512 * 1024, timeout=30)
    assert started is not None, "the holder sent no pieces to the early nodes"
    assert all(Snapshot.of(a).segments["peer"] == 0 for a in early), "too late: a segment was done"
    results = pull_all([a.host for a in late], blob_path(b.repo, b.digest), timeout=120)
    assert_verified([p.result(120) for p in pulls] + results, b)

    snaps = scene.snapshots(late)
    hedges = {w: total(snaps, "hedges", w) for w in snaps[0].hedges}
    print(f"late nodes' hedged first-piece reads, by winner: {hedges}")
    assert hedges["other"] >= 1, "no first-piece read was answered by anyone but the busy holder"
    assert scene.upstream.blob_bytes(mark, {b.digest}) == 0


def test_a_node_killed_mid_pull_keeps_what_it_had(scene: Scene, blob: BlobMaker) -> None:
    """kill -9 a node half-way through a pull from a peer, restart it: libtorrent
    checks the segment files it left, the node takes only the missing bytes from
    its peer, and nothing from upstream."""
    b = blob("resume", 64 * MiB)
    tracker = scene.tracker()
    seed, node = scene.start_agents(scene.nodes[:2], tracker.url, segment_size="8MiB")
    assert_verified(pull_all([seed.host], blob_path(b.repo, b.digest)), b)
    mark = scene.upstream.access_log.mark()
    _, pulls = start_pulls([node.host], blob_path(b.repo, b.digest), timeout=120)
    assert wait_first([node], lambda s: s.served["peer"], b.size * 0.4, timeout=60) is not None
    before = Snapshot.of(node).served["peer"]
    node.kill9()
    pulls[0].result(30)
    assert before < b.size, "too late: the node had the whole blob"
    assert not (node.blob_dir(b.digest) / "complete").exists()

    node.start()
    assert_verified(pull_all([node.host], blob_path(b.repo, b.digest)), b)
    resumed = node.metric("fleetp2p_resumed_bytes_total")
    fetched = node.metric("fleetp2p_fetched_bytes_total", source="peer")
    print(f"killed after {before / b.size:.0%} of the blob had reached the client; "
          f"the restarted node kept {resumed / b.size:.0%} and fetched {fetched / b.size:.0%}")
    assert resumed >= before  # every byte a client had was on disk, hash-checked
    assert fetched == b.size - resumed
    assert scene.upstream.blob_bytes(mark, {b.digest}) == 0


def _corrupt_segments(directory: Path, piece_size: int) -> int:
    """Flip 16 bytes at the start of every piece of every segment file; returns pieces hit."""
    hit = 0
    for path in sorted(p for p in directory.iterdir() if p.name.isdigit()):
        size = path.stat().st_size
        with open(path, "r+b") as f:
            for offset in range(0, size, piece_size):
                f.seek(offset)
                data = f.read(16)
                f.seek(offset)
                f.write(bytes(x ^ 0xFF for x in data))
                hit += 1
    return hit


def test_corrupt_peer_never_reaches_a_client(scene: Scene, blob: BlobMaker) -> None:
    """node1 fetched the blob, node2 got it from node1 (so node1's libtorrent has
    verified every piece and will not check them again); then node1's segment
    files are overwritten on disk. Six nodes pull: node1's pieces fail the hash
    at the receivers, who get them elsewhere; every client gets the right bytes."""
    b = blob("corrupt", 64 * MiB)
    tracker = scene.tracker()
    piece = 256 * 1024
    bad, good, *rest = scene.start_agents(scene.nodes[:8], tracker.url, segment_size="16MiB",
                                          piece_size="256KiB")
    assert_verified(pull_all([bad.host], blob_path(b.repo, b.digest)), b)
    assert_verified(pull_all([good.host], blob_path(b.repo, b.digest)), b)
    hit = _corrupt_segments(bad.blob_dir(b.digest), piece)
    print(f"corrupted {hit} pieces on {bad.host.name}")
    # node1 handed every piece to node2: the next wave gets pieces from node1
    # again only once that round is over (handouts.py), else it would read
    # from node2 alone and the check would go unexercised.
    time.sleep(ROUND_QUIET + 0.5)

    results = pull_all([a.host for a in rest], blob_path(b.repo, b.digest), timeout=120)
    assert_verified(results, b)
    snaps = scene.snapshots(rest)
    failures = total(snaps, "hash_failures")
    print(f"piece hash failures at the receivers: {failures:.0f}")
    assert failures > 0, "no receiver saw a corrupt piece: the scenario did not exercise the check"


def test_pulls_succeed_without_a_tracker(scene: Scene, blob: BlobMaker) -> None:
    """node1-2 point at a tracker address where nothing listens; node3-4 lose their
    tracker (kill -9) in the middle of a cooperative fetch. All four get the blob."""
    b = blob("notracker", 64 * MiB)
    scene.set_rate([scene.net["registry"]], "200mbit")
    tracker = scene.tracker()
    nowhere = f"http://{scene.net['tracker'].addr}:7999"
    orphans = scene.start_agents(scene.nodes[:2], nowhere, segment_size="16MiB")
    fleet = scene.start_agents(scene.nodes[2:4], tracker.url, segment_size="16MiB")
    _, pulls = start_pulls([a.host for a in [*orphans, *fleet]], blob_path(b.repo, b.digest),
                           timeout=120)
    assert wait_first(fleet, lambda s: s.upstream_blob_bytes, 4 * MiB, timeout=30) is not None
    tracker.kill9()
    results = [p.result(120) for p in pulls]
    assert_verified(results, b)
    for a, snap in zip(orphans, scene.snapshots(orphans)):
        assert snap.served["upstream"] == b.size, f"{a.host.name} served {snap.served}"


def test_two_trackers_on_one_redis(scene: Scene, blob: BlobMaker) -> None:
    """Nodes on different tracker replicas (one Redis) still find each other."""
    b = blob("redis", 64 * MiB)
    redis = scene.redis()
    first = scene.tracker(7000, redis=redis.url)
    second = scene.tracker(7001, redis=redis.url)
    a1, = scene.start_agents(scene.nodes[:1], first.url, segment_size="16MiB")
    a2, = scene.start_agents(scene.nodes[1:2], second.url, segment_size="16MiB")
    assert_verified(pull_all([a1.host], blob_path(b.repo, b.digest)), b)
    mark = scene.upstream.access_log.mark()
    assert_verified(pull_all([a2.host], blob_path(b.repo, b.digest)), b)
    snap = Snapshot.of(a2)
    assert snap.segments["peer"] > 0, f"second node's segments: {snap.segments}"
    assert snap.upstream_blob_bytes == 0
    assert scene.upstream.blob_bytes(mark, {b.digest}) == 0


def test_containerd_second_host_pulls_layers_from_first(scene: Scene) -> None:
    """`ctr image pull` on two hosts, each through its own agent (hosts.toml mirror
    http://127.0.0.1:5050 inside its namespace), sharing one containerd daemon."""
    layout = build_image(scene.workdir / "image", [6 * MiB, 12 * MiB], tag="v1")
    pushed = scene.upstream.push_layout(layout, "fleet/app")
    layers = {blob.digest: blob.size for blob in layout.image.layers}
    tracker = scene.tracker()
    h1, h2 = scene.nodes[:2]
    a1, a2 = scene.start_agents([h1, h2], tracker.url, segment_size="4MiB")
    hosts_dir = write_hosts_dir(scene.workdir / "hosts", scene.upstream.name, scene.upstream.url,
                                "http://127.0.0.1:5050")
    with start_containerd() as ctrd:
        def pull(host_agent: FleetAgent) -> None:
            host_agent.host.run("ctr", "-a", str(ctrd.socket), "-n", "default", "image", "pull",
                                "--snapshotter", ctrd.snapshotter, "--plain-http",
                                "--hosts-dir", str(hosts_dir), pushed.ref, timeout=180)

        pull(a1)
        assert pushed.ref in ctrd.image_names()
        ctrd.forget(pushed.ref)  # the shared daemon must fetch every byte again
        mark = scene.upstream.access_log.mark()
        pull(a2)
        assert pushed.ref in ctrd.image_names()

    again = {e.blob_digest for e in scene.upstream.access_log.blob_gets(mark)}
    assert not again & layers.keys(), "the registry sent layers a second time"
    snap = Snapshot.of(a2)
    print(f"second host: served {snap.served}, segments {snap.segments}")
    assert snap.served["peer"] >= sum(layers.values())
    assert Snapshot.of(a1).served["upstream"] >= sum(layers.values())


def test_containerd_pull_resumes_after_its_agent_was_killed(scene: Scene) -> None:
    """One host, its agent with an embedded tracker (which forgets everything when
    the agent dies). kill -9 the agent while containerd pulls a 64 MiB layer
    through it (containerd then falls back to the registry, as hosts.toml lets
    it). Restarted, the agent keeps the segments it had (checked against the
    metainfo it saved, and published again), so containerd's next pull through
    it takes only the rest from the registry."""
    layout = build_image(scene.workdir / "big", [64 * MiB], tag="v1")
    pushed = scene.upstream.push_layout(layout, "fleet/resume")
    layer = layout.image.layers[0]
    scene.set_rate([scene.net["registry"]], "100mbit")  # ~6 s for the layer
    agent, = scene.start_agents(scene.nodes[:1], "embedded", segment_size="8MiB")
    hosts_dir = write_hosts_dir(scene.workdir / "hosts", scene.upstream.name, scene.upstream.url,
                                "http://127.0.0.1:5050")
    with start_containerd() as ctrd:
        def pull() -> None:
            agent.host.run("ctr", "-a", str(ctrd.socket), "-n", "default", "image", "pull",
                           "--snapshotter", ctrd.snapshotter, "--plain-http", "--hosts-dir",
                           str(hosts_dir), pushed.ref, timeout=180)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(pull)
            assert wait_first([agent], lambda s: s.upstream_blob_bytes, layer.size // 2,
                              timeout=60) is not None
            agent.kill9()
            first.result(200)
        assert not (agent.blob_dir(layer.digest) / "complete").exists()
        ctrd.forget(pushed.ref)

        agent.start()
        mark = scene.upstream.access_log.mark()
        pull()
        assert pushed.ref in ctrd.image_names()
    snap = Snapshot.of(agent)
    again = scene.upstream.blob_bytes(mark, {layer.digest})
    resumed = agent.metric("fleetp2p_resumed_bytes_total")
    print(f"after the restart: kept {resumed / MiB:.0f} MiB, the registry sent "
          f"{again / MiB:.1f} MiB of the {layer.size / MiB:.0f} MiB layer")
    assert snap.served["upstream"] + snap.served["local"] + snap.served["peer"] >= layer.size
    assert resumed >= layer.size // 2 - 8 * MiB  # the segment in flight is fetched again
    assert again <= layer.size - resumed
