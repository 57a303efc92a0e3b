"""Real clients (containerd, skopeo, podman) pulling through the fleetp2p agent.

Every test gets a cold agent and a cold client. The upstream's access log is the
ground truth for bytes that left the registry, split by User-Agent: a client's own
UA there means it bypassed the agent (mirror fallback), which the tests forbid.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import threading
from pathlib import Path
from typing import Callable

import pytest

from harness.agent import Agent, UpstreamEntry, metric_sum
from harness.containerd import Containerd, start_containerd
from harness.images import Layout, Pushed
from harness.pagecache import settled_resident
from harness.registry import Registry
from harness.skopeo import Podman, skopeo_copy_to_oci, write_mirrors_conf

from fleetp2p.cli.registriesconf import check_registries_conf
from fleetp2p.store.pagecache import RELEASE_DELAY

SERVED = "fleetp2p_served_bytes_total"
REQUESTS = "fleetp2p_requests_total"
REGISTRIES = ["registry_anon", "registry_basic", "registry_token"]


def served(agent: Agent) -> tuple[float, float]:
    """(upstream, local) bytes the agent has served to clients."""
    m = agent.metrics()
    return metric_sum(m, SERVED, source="upstream"), metric_sum(m, SERVED, source="local")


def blob_gets(agent: Agent) -> float:
    """Blob GETs the agent answered with 200 or 206."""
    m = agent.metrics()
    return sum(metric_sum(m, REQUESTS, endpoint="blob", method="GET", status=s) for s in ("200", "206"))


def assert_fetched_once(reg: Registry, since: int, blobs: dict[str, int], client_ua: str) -> None:
    """The upstream sent each blob's bytes exactly once, all of it to the agent."""
    log = reg.access_log
    log.settle()
    assert log.blob_bytes(since, user_agent=client_ua) == 0, \
        f"{client_ua} fetched blobs from the upstream itself: the agent was bypassed"
    assert log.blob_bytes_by_digest(since) == blobs


# containerd ----------------------------------------------------------------------

@pytest.mark.parametrize("registry_name", REGISTRIES)
def test_containerd_second_pull_is_local(request: pytest.FixtureRequest, registry_name: str, agent: Agent,
                                         containerd: Containerd, small_image: Layout,
                                         pushed: Callable[..., Pushed],
                                         hosts_dir_for: Callable[..., Path]) -> None:
    """Cold pull goes upstream once; after containerd forgets everything, the re-pull is
    served entirely from the agent's store (0 upstream blob bytes)."""
    reg: Registry = request.getfixturevalue(registry_name)
    p = pushed(reg, small_image, "team/app")
    hosts = hosts_dir_for(agent, reg)
    image = small_image.image
    want = {b.digest: b.size for b in image.blobs}

    mark = reg.access_log.mark()
    containerd.pull(p.ref, hosts_dir=hosts)
    assert p.ref in containerd.image_names()
    assert {p.digest, *want} <= containerd.content_digests()
    assert_fetched_once(reg, mark, want, "containerd")
    up1, local1 = served(agent)
    assert up1 > 0, "no upstream-sourced bytes in agent metrics after a cold pull"
    assert up1 + local1 == image.blob_bytes
    assert blob_gets(agent) == len(image.blobs)
    assert metric_sum(agent.metrics(), REQUESTS, endpoint="manifest") >= 1

    containerd.forget(p.ref)
    mark = reg.access_log.mark()
    containerd.pull(p.ref, hosts_dir=hosts)
    assert p.ref in containerd.image_names()
    reg.access_log.settle()
    assert reg.access_log.blob_bytes(mark) == 0, reg.access_log.blob_bytes_by_digest(mark)
    up2, local2 = served(agent)
    assert up2 == up1, "second pull pulled bytes from upstream"
    assert local2 - local1 == image.blob_bytes
    assert blob_gets(agent) == 2 * len(image.blobs)
    if reg.token_server is not None:
        assert all(r.username == reg.username for r in reg.token_server.requests if r.status == 200)


def test_containerd_through_uvloop_agent(agent_factory: Callable[..., Agent], containerd: Containerd,
                                         registry_anon: Registry, small_image: Layout,
                                         pushed: Callable[..., Pushed],
                                         hosts_dir_for: Callable[..., Path]) -> None:
    """`event_loop = "uvloop"` serves through its copy path (uvloop has no loop.sendfile):
    a cold pull, then a re-pull from the store, both byte-exact for containerd."""
    agent = agent_factory(registry_anon, default=registry_anon, event_loop="uvloop")
    p = pushed(registry_anon, small_image, "team/uvloop")
    hosts = hosts_dir_for(agent, registry_anon)
    want = {b.digest: b.size for b in small_image.image.blobs}
    mark = registry_anon.access_log.mark()
    containerd.pull(p.ref, hosts_dir=hosts)
    assert_fetched_once(registry_anon, mark, want, "containerd")
    containerd.forget(p.ref)
    mark = registry_anon.access_log.mark()
    containerd.pull(p.ref, hosts_dir=hosts)
    registry_anon.access_log.settle()
    assert registry_anon.access_log.blob_bytes(mark) == 0
    up, local = served(agent)
    assert up + local == 2 * small_image.image.blob_bytes and local == small_image.image.blob_bytes


def test_containerd_multiplatform_index(agent: Agent, containerd: Containerd, registry_anon: Registry,
                                        multiplatform_image: Layout, pushed: Callable[..., Pushed],
                                        hosts_dir_for: Callable[..., Path]) -> None:
    """Only the requested platform's blobs leave the upstream; the other is fetched on its own pull."""
    p = pushed(registry_anon, multiplatform_image, "team/multi")
    hosts = hosts_dir_for(agent, registry_anon)
    arm = multiplatform_image.images["linux/arm64"]
    amd = multiplatform_image.images["linux/amd64"]

    mark = registry_anon.access_log.mark()
    containerd.pull(p.ref, hosts_dir=hosts, platform="linux/arm64")
    assert_fetched_once(registry_anon, mark, {b.digest: b.size for b in arm.blobs}, "containerd")
    assert {arm.manifest.digest, *(b.digest for b in arm.blobs)} <= containerd.content_digests()

    mark = registry_anon.access_log.mark()
    containerd.pull(p.ref, hosts_dir=hosts)  # host default: linux/amd64
    assert_fetched_once(registry_anon, mark, {b.digest: b.size for b in amd.blobs}, "containerd")
    up, local = served(agent)
    assert up + local == arm.blob_bytes + amd.blob_bytes

    containerd.forget(p.ref)
    mark = registry_anon.access_log.mark()
    containerd.pull(p.ref, hosts_dir=hosts, platform="linux/arm64")
    registry_anon.access_log.settle()
    assert registry_anon.access_log.blob_bytes(mark) == 0
    up2, local2 = served(agent)
    assert up2 == up and local2 - local == arm.blob_bytes


def test_containerd_manifest_by_digest(agent: Agent, containerd: Containerd, registry_basic: Registry,
                                       small_image: Layout, pushed: Callable[..., Pushed],
                                       hosts_dir_for: Callable[..., Path]) -> None:
    """`repo@sha256:` references resolve through the agent too (no tag lookup)."""
    p = pushed(registry_basic, small_image, "team/app")
    mark = registry_basic.access_log.mark()
    containerd.pull(p.digest_ref, hosts_dir=hosts_dir_for(agent, registry_basic))
    assert_fetched_once(registry_basic, mark, {b.digest: b.size for b in small_image.image.blobs},
                        "containerd")


def test_containerd_fetches_model_artifact(agent: Agent, containerd: Containerd, registry_token: Registry,
                                           model_artifact: Layout, pushed: Callable[..., Pushed],
                                           hosts_dir_for: Callable[..., Path]) -> None:
    """An OCI artifact (artifactType, empty config, ≥200 MiB raw weights layer): `ctr content
    fetch` (no unpack) through the agent, then again from the agent's store alone."""
    p = pushed(registry_token, model_artifact, "models/llm")
    hosts = hosts_dir_for(agent, registry_token)
    art = model_artifact.image
    want = {b.digest: b.size for b in art.blobs}

    mark = registry_token.access_log.mark()
    containerd.fetch(p.ref, hosts_dir=hosts)
    assert {p.digest, *want} <= containerd.content_digests()  # containerd verified every digest
    manifest = json.loads(containerd.read_blob(p.digest))
    assert manifest["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert_fetched_once(registry_token, mark, want, "containerd")
    up1, local1 = served(agent)
    assert up1 >= art.layers[0].size * 0.5 and up1 + local1 == art.blob_bytes
    weights = agent.data_dir / "blobs" / "sha256" / art.layers[0].digest.split(":", 1)[1]
    limit = art.layers[0].size // 10  # what containerd read after a release comes back
    assert settled_resident(weights, timeout=RELEASE_DELAY + 5, at_most=limit) <= limit, \
        "the agent kept the weights it had verified and streamed in the page cache"

    # again, from the store: the released weights come from disk, read into the
    # page cache off the event loop (registry/sendfile.py), and containerd
    # checks every digest
    containerd.forget(p.ref)
    mark = registry_token.access_log.mark()
    containerd.fetch(p.ref, hosts_dir=hosts)
    assert {p.digest, *want} <= containerd.content_digests()
    registry_token.access_log.settle()
    assert registry_token.access_log.blob_bytes(mark) == 0
    up2, local2 = served(agent)
    assert up2 == up1 and local2 - local1 == art.blob_bytes


def test_concurrent_cold_pulls_fetch_once(agent: Agent, registry_anon: Registry, small_image: Layout,
                                          pushed: Callable[..., Pushed],
                                          hosts_dir_for: Callable[..., Path]) -> None:
    """Three containerds pull the same cold image at once: each blob leaves the upstream once."""
    p = pushed(registry_anon, small_image, "team/app")
    hosts = hosts_dir_for(agent, registry_anon)
    mark = registry_anon.access_log.mark()
    errors: list[BaseException] = []
    with contextlib.ExitStack() as stack:
        daemons = [stack.enter_context(start_containerd()) for _ in range(3)]

        def pull(cd: Containerd) -> None:
            try:
                cd.pull(p.ref, hosts_dir=hosts)
            except BaseException as e:  # re-raised below, in the test's thread
                errors.append(e)

        threads = [threading.Thread(target=pull, args=(cd,)) for cd in daemons]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert not errors, errors[0]
    assert_fetched_once(registry_anon, mark, {b.digest: b.size for b in small_image.image.blobs}, "containerd")
    up, local = served(agent)
    assert up + local == 3 * small_image.image.blob_bytes


def test_store_survives_agent_crash(agent: Agent, containerd: Containerd, registry_anon: Registry,
                                    small_image: Layout, pushed: Callable[..., Pushed],
                                    hosts_dir_for: Callable[..., Path]) -> None:
    """kill -9 after a pull, restart on the same data_dir: the re-pull needs no upstream blob."""
    p = pushed(registry_anon, small_image, "team/app")
    hosts = hosts_dir_for(agent, registry_anon)
    containerd.pull(p.ref, hosts_dir=hosts)
    agent.kill9()
    assert not agent.alive()
    agent.start()
    containerd.forget(p.ref)
    mark = registry_anon.access_log.mark()
    containerd.pull(p.ref, hosts_dir=hosts)
    registry_anon.access_log.settle()
    assert registry_anon.access_log.blob_bytes(mark) == 0
    up, local = served(agent)  # counters restart with the process
    assert up == 0 and local == small_image.image.blob_bytes
    assert agent.stop() == 0, "SIGTERM should be a clean shutdown"


# skopeo and podman ------------------------------------------------------------------

@pytest.mark.parametrize("registry_name", ["registry_anon", "registry_token"])
def test_skopeo_copy_through_mirror(request: pytest.FixtureRequest, registry_name: str,
                                    agent_factory: Callable[..., Agent], small_image: Layout,
                                    pushed: Callable[..., Pushed], tmp_path: Path,
                                    registries_conf_for: Callable[..., Path]) -> None:
    """skopeo sends no ?ns=: the agent must use default_registry. Layers arrive byte-identical."""
    reg: Registry = request.getfixturevalue(registry_name)
    agent = agent_factory(reg, default=reg)
    p = pushed(reg, small_image, "team/app")
    conf = registries_conf_for(reg, agent)
    want = {b.digest: b.size for b in small_image.image.blobs}

    mark = reg.access_log.mark()
    skopeo_copy_to_oci(p.ref, tmp_path / "first", registries_conf=conf)
    assert_fetched_once(reg, mark, want, "skopeo")
    for blob in small_image.image.blobs:
        assert filecmp.cmp(blob.path, tmp_path / "first" / "blobs" / "sha256" / blob.digest[7:], shallow=False)
    index = json.loads((tmp_path / "first" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == p.digest
    up1, local1 = served(agent)
    assert up1 > 0 and up1 + local1 == small_image.image.blob_bytes

    mark = reg.access_log.mark()
    skopeo_copy_to_oci(p.ref, tmp_path / "second", registries_conf=conf)
    reg.access_log.settle()
    assert reg.access_log.blob_bytes(mark) == 0
    up2, local2 = served(agent)
    assert up2 == up1 and local2 - local1 == small_image.image.blob_bytes


def test_skopeo_reaches_several_registries_named_in_the_mirror_path(
        agent_factory: Callable[..., Agent], registry_anon: Registry, registry_token: Registry,
        small_image: Layout, multiplatform_image: Layout, pushed: Callable[..., Pushed],
        tmp_path: Path) -> None:
    """registries.conf mirror locations `<agent>/<registry>`: one agent mirrors two
    registries for skopeo, neither of them its default (which does not exist). The
    registries get dotted names in [[registries]]: registries.conf allows no port in
    a mirror's path."""
    pulls = {"anon.registry.test": (registry_anon, small_image),
             "token.registry.test": (registry_token, multiplatform_image)}
    agent = agent_factory(*(UpstreamEntry(name, reg.url, reg.username, reg.password)
                            for name, (reg, _) in pulls.items()),
                          default="default.registry.test")
    conf = write_mirrors_conf(tmp_path / "registries.conf",
                              {name: f"{agent.host}/{name}" for name in pulls})
    total = 0
    for name, (reg, layout) in pulls.items():
        p = pushed(reg, layout, "team/app")
        want = {b.digest: b.size for b in layout.all_blobs()}
        mark = reg.access_log.mark()
        dest = tmp_path / name
        skopeo_copy_to_oci(f"{name}/{p.repo}:{p.tag}", dest, registries_conf=conf, all_platforms=True)
        assert json.loads((dest / "index.json").read_text())["manifests"][0]["digest"] == p.digest
        assert_fetched_once(reg, mark, want, "skopeo")
        total += sum(want.values())
    up, local = served(agent)
    assert up + local == total
    # and `fleetp2p doctor` agrees with skopeo about that file
    assert [(c.name, c.status) for c in check_registries_conf(
        str(conf), agent.url, "default.registry.test", True)] == [
        (f"registries.conf {name}", "pass") for name in pulls]


def test_skopeo_copy_all_platforms(agent: Agent, registry_anon: Registry, multiplatform_image: Layout,
                                   pushed: Callable[..., Pushed], tmp_path: Path,
                                   registries_conf_for: Callable[..., Path]) -> None:
    """`skopeo copy --all` of an index via the default registry: index digest kept, every
    platform's blobs fetched upstream once."""
    p = pushed(registry_anon, multiplatform_image, "team/multi")
    mark = registry_anon.access_log.mark()
    dest = tmp_path / "all"
    skopeo_copy_to_oci(p.ref, dest, registries_conf=registries_conf_for(registry_anon, agent),
                       all_platforms=True)
    assert json.loads((dest / "index.json").read_text())["manifests"][0]["digest"] == p.digest
    want = {b.digest: b.size for b in multiplatform_image.all_blobs()}
    assert_fetched_once(registry_anon, mark, want, "skopeo")
    up, local = served(agent)
    assert up + local == sum(want.values())


def test_podman_pull_through_mirror(agent: Agent, registry_anon: Registry, small_image: Layout,
                                    pushed: Callable[..., Pushed], registries_conf_for: Callable[..., Path],
                                    podman_factory: Callable[[Path], Podman]) -> None:
    p = pushed(registry_anon, small_image, "team/app")
    podman = podman_factory(registries_conf_for(registry_anon, agent))
    mark = registry_anon.access_log.mark()
    podman.pull(p.ref)
    assert podman.image_digests() == [p.digest]
    assert_fetched_once(registry_anon, mark, {b.digest: b.size for b in small_image.image.blobs},
                        "containers/")
    up, local = served(agent)
    assert up > 0 and up + local == small_image.image.blob_bytes
