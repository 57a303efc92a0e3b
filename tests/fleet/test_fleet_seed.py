"""Seed a release on one host, pull it everywhere else with nothing from upstream.

Host A's agent seeds (`fleetp2p seed`, pinned) a two-platform OCI index with
`--all-platforms` and a model-weights OCI artifact (a 200 MiB raw layer) from
the upstream docker-registry. From then on the registry may answer manifest
requests, but no blob byte may leave it:

- host B pulls through its own agent with containerd (`ctr image pull` of the
  index for the host's platform, `ctr content fetch` of the artifact: `ctr
  image pull` would fail unpacking a non-image), then runs `fleetp2p pull`
  of both: the index with `--all-platforms`, so the platform containerd did
  not take shows up as bytes from peers and the rest as already local;
- host C, whose store is empty, runs `fleetp2p pull` of both: every byte from
  peers;
- a second seed on A fetches nothing.

Every agent runs with `swarm_min_size = 1`: by default (1 MiB) smaller blobs go
straight to upstream by design (README, `swarm_min_size`), here the image
configs, the artifact's 2-byte empty config and its 64 KiB tokenizer (65,790
bytes measured with the default), and "0 upstream blob bytes" could not hold.

Verification: containerd checks every digest it commits, a pull's JSON
summary is only emitted after every blob reached its full size, which the
agent releases only once the blob hashed to its digest (fleetp2p/admin/pull.py),
and the agents' `verification_failures` stay 0. On top of that the test hashes
host C's stored copy of the weights itself.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pytest

from harness.containerd import start_containerd, write_hosts_dir
from harness.images import MODEL_ARTIFACT_TYPE, Layout, Pushed, build_model_artifact, \
    build_multiplatform

from fleetp2p.admin.resolve import host_platform

from .agents import FleetAgent, Snapshot
from .netns import Host
from .scene import Scene
from .services import fleetp2p_command

pytestmark = pytest.mark.slow

MiB = 1 << 20
WEIGHTS_SIZE = 200 * MiB
PLATFORMS = ("linux/amd64", "linux/arm64")
HOST_PLATFORM = str(host_platform())  # what `ctr image pull` takes from an index
AGENT_SETTINGS = {"swarm_min_size": "1"}


def cli_json(host: Host, *args: str, timeout: float = 120) -> dict[str, Any]:
    """`fleetp2p ARGS --json` on `host`, against that host's agent (admin API on its loopback)."""
    result = host.run(*fleetp2p_command(*args, "--agent", "http://127.0.0.1:5050", "--json"),
                      timeout=timeout, check=False)
    assert result.returncode == 0, (f"fleetp2p {' '.join(args)} on {host.name} exited "
                                    f"{result.returncode}:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout)


def blob_sizes(layout: Layout, platforms: tuple[str, ...] | None = None) -> dict[str, int]:
    images = [img for p, img in layout.images.items() if platforms is None or p in platforms]
    return {b.digest: b.size for img in images for b in img.blobs}


def assert_summary(summary: dict[str, Any], pushed: Pushed, want: dict[str, int],
                   by_source: dict[str, int], manifests: int, pinned: bool) -> None:
    """A seed/pull JSON summary: the reference, every blob, where the bytes came from."""
    assert summary["digest"] == pushed.digest, summary
    assert summary["blobs"] == len(want), summary
    assert summary["bytes"] == sum(want.values()), summary
    assert summary["manifests"] == manifests, summary
    assert summary["by_source"] == {"upstream": 0, "peer": 0, "local": 0, **by_source}, summary
    assert summary["pinned"] == (pushed.ref if pinned else None), summary


def stored_sha256(agent: FleetAgent, digest: str) -> str:
    """The digest of the agent's stored copy, hashed here from its segment files."""
    path = agent.blob_dir(digest)
    if path.is_file():
        files = [path]
    else:
        assert (path / "complete").is_file(), f"{digest} is not complete on {agent.host.name}"
        files = sorted((p for p in path.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    sha = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(8 * MiB):
                sha.update(chunk)
    return f"sha256:{sha.hexdigest()}"


def test_seeded_release_reaches_other_hosts_without_upstream(scene: Scene) -> None:
    t0 = time.monotonic()
    steps: list[tuple[str, float]] = []

    def step(name: str) -> None:
        steps.append((name, time.monotonic() - t0))

    if HOST_PLATFORM not in PLATFORMS:
        pytest.skip(f"containerd would pull {HOST_PLATFORM}, not in the test index")
    multi = build_multiplatform(scene.workdir / "multi", [4 * MiB, 8 * MiB], tag="v1",
                                platforms=PLATFORMS)
    model = build_model_artifact(scene.workdir / "model", WEIGHTS_SIZE, tag="v1",
                                 extra_files={"tokenizer.json": 64 * 1024})
    index = scene.upstream.push_layout(multi, "seed/app")
    artifact = scene.upstream.push_layout(model, "seed/model")
    weights = model.image.layers[0]
    assert weights.size >= 200 * MiB and weights.media_type.endswith(".raw")
    want_index = blob_sizes(multi)
    want_host = blob_sizes(multi, (HOST_PLATFORM,))
    want_other = {d: s for d, s in want_index.items() if d not in want_host}
    want_model = blob_sizes(model)
    index_bytes, model_bytes = sum(want_index.values()), sum(want_model.values())
    host_bytes, other_bytes = sum(want_host.values()), sum(want_other.values())
    step("built and pushed")

    tracker = scene.tracker()
    a, b, c = scene.start_agents(scene.nodes[:3], tracker.url, **AGENT_SETTINGS)
    step("agents up")

    # Host A seeds both references from upstream and pins them.
    seeded_index = cli_json(a.host, "seed", index.ref, "--all-platforms")
    assert sorted(seeded_index["platforms"]) == sorted(PLATFORMS)
    assert_summary(seeded_index, index, want_index, {"upstream": index_bytes},
                   manifests=3, pinned=True)
    seeded_model = cli_json(a.host, "seed", artifact.ref)
    assert seeded_model["artifact_type"] == MODEL_ARTIFACT_TYPE
    assert_summary(seeded_model, artifact, want_model, {"upstream": model_bytes},
                   manifests=1, pinned=True)
    step("seeded on A")

    status_a = cli_json(a.host, "status")
    pins = {p["label"]: p for p in status_a["pins"]}
    assert pins.keys() == {index.ref, artifact.ref}, status_a["pins"]
    assert pins[index.ref]["digests"] == pins[index.ref]["present"] == len(want_index) + 3
    assert pins[artifact.ref]["digests"] == pins[artifact.ref]["present"] == len(want_model) + 1
    assert status_a["store"]["pinned_bytes"] >= index_bytes + model_bytes
    upstream_a = Snapshot.of(a).upstream_blob_bytes
    assert upstream_a == index_bytes + model_bytes

    mark = scene.upstream.access_log.mark()

    # Host B: containerd through B's agent.
    hosts_dir = write_hosts_dir(scene.workdir / "hosts", scene.upstream.name, scene.upstream.url,
                                "http://127.0.0.1:5050")
    with start_containerd() as ctrd:
        def ctr(*command: str, ref: str) -> None:
            b.host.run("ctr", "-a", str(ctrd.socket), "-n", "default", *command, "--plain-http",
                       "--hosts-dir", str(hosts_dir), ref, timeout=180)

        ctr("image", "pull", "--snapshotter", ctrd.snapshotter, ref=index.ref)
        assert index.ref in ctrd.image_names()
        ctr("content", "fetch", ref=artifact.ref)
        step("containerd pulled on B")
        # containerd commits content only under the digest it verified
        content = ctrd.content_digests()
        host_manifest = multi.images[HOST_PLATFORM].manifest.digest
        assert {index.digest, host_manifest, *want_host} <= content
        assert not content & want_other.keys(), "containerd took the other platform too"
        assert {artifact.digest, *want_model} <= content
        assert json.loads(ctrd.read_blob(artifact.digest))["artifactType"] == MODEL_ARTIFACT_TYPE

    served_b = Snapshot.of(b).served
    print(f"B served to containerd: {served_b}")
    assert served_b["peer"] == host_bytes + model_bytes and served_b["upstream"] == 0, served_b

    # Host B: the CLI. What containerd took is local now; the other platform comes from peers.
    pulled_index_b = cli_json(b.host, "pull", index.ref, "--all-platforms")
    assert_summary(pulled_index_b, index, want_index,
                   {"local": host_bytes, "peer": other_bytes},
                   manifests=3, pinned=False)
    pulled_model_b = cli_json(b.host, "pull", artifact.ref)
    assert_summary(pulled_model_b, artifact, want_model, {"local": model_bytes},
                   manifests=1, pinned=False)
    step("fleetp2p pull on B")

    # Host C, cold: every byte from peers.
    pulled_index_c = cli_json(c.host, "pull", index.ref, "--all-platforms")
    assert_summary(pulled_index_c, index, want_index, {"peer": index_bytes},
                   manifests=3, pinned=False)
    pulled_model_c = cli_json(c.host, "pull", artifact.ref)
    assert pulled_model_c["artifact_type"] == MODEL_ARTIFACT_TYPE
    assert_summary(pulled_model_c, artifact, want_model, {"peer": model_bytes},
                   manifests=1, pinned=False)
    step("fleetp2p pull on C")
    print("summary seconds: " + ", ".join(
        f"{name} {s['seconds']:.1f}s" for name, s in [
            ("seed index A", seeded_index), ("seed model A", seeded_model),
            ("pull index B", pulled_index_b), ("pull model B", pulled_model_b),
            ("pull index C", pulled_index_c), ("pull model C", pulled_model_c)]))
    assert stored_sha256(c, weights.digest) == weights.digest

    scene.upstream.access_log.settle()
    sent = scene.upstream.access_log.blob_bytes_by_digest(mark)
    print(f"upstream blob bytes after the seeds: {sent}; manifest requests: "
          f"{scene.upstream.access_log.manifest_requests(mark)}")
    assert sent == {}, f"the registry sent blobs after the seeds: {sent}"
    for agent in (b, c):
        snap = Snapshot.of(agent)
        status = cli_json(agent.host, "status")
        print(f"{agent.host.name}: served {snap.served}, segments {snap.segments}, "
              f"fetched {status['fetched_bytes']}")
        assert snap.upstream_blob_bytes == 0, f"{agent.host.name} fetched blob bytes upstream"
        assert status["verification_failures"] == 0
        assert snap.segments["peer"] > 0 and snap.segments["upstream"] == 0, snap.segments
    assert Snapshot.of(c).hash_failures == 0

    # A second seed on A finds everything local.
    again_index = cli_json(a.host, "seed", index.ref, "--all-platforms")
    assert_summary(again_index, index, want_index, {"local": index_bytes},
                   manifests=3, pinned=True)
    again_model = cli_json(a.host, "seed", artifact.ref)
    assert_summary(again_model, artifact, want_model, {"local": model_bytes},
                   manifests=1, pinned=True)
    assert Snapshot.of(a).upstream_blob_bytes == upstream_a
    assert scene.upstream.blob_bytes(mark) == 0
    step("re-seeded on A")
    print("  ".join(f"{name} {at:.1f}s" for name, at in steps))
