"""The operator CLI (`seed`, `pull`, `status`) against a real agent subprocess and a
real docker-registry, plus the admin API's guards in process.

Ground truth for "fetched nothing" is the agent's own upstream byte counter and the
registry's access log; for "evicted" it is the agent's data dir on disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import aiohttp
import pytest
from aiohttp import web

from harness.agent import Agent
from harness.images import MODEL_ARTIFACT_TYPE, Layout, Pushed, build_image, build_model_artifact
from harness.ports import free_port
from harness.registry import Registry
from tests.inprocess import FakeUpstream, agent_for, running

MiB = 1 << 20
UPSTREAM_BLOB_BYTES = "fleetp2p_upstream_bytes_total"
REPO_ROOT = Path(__file__).resolve().parents[1]


def swarm_ports() -> dict[str, str]:
    """Free ports for the embedded tracker and peer listener, so test agents never
    collide with another agent on this machine over the default 5051/6881."""
    return {"tracker_listen": f"127.0.0.1:{free_port()}", "peer_listen": f"127.0.0.1:{free_port()}"}


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetp2p", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


def cli_json(*args: str) -> dict:
    result = cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def stored(agent: Agent, digest: str) -> bool:
    """The blob is complete in the agent's store: a whole file (flat layout) or a
    segment directory with its `complete` marker (segmented layout)."""
    algorithm, _, hexpart = digest.partition(":")
    path = agent.data_dir / "blobs" / algorithm / hexpart
    return path.is_file() or (path / "complete").is_file()


def mirror_get(agent: Agent, registry: Registry, repo: str, digest: str) -> bytes:
    """A blob as a containerd client gets it through the agent."""
    url = f"{agent.url}/v2/{repo}/blobs/{digest}?ns={registry.host}"
    with urllib.request.urlopen(url, timeout=60) as resp:
        return resp.read()


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleetp2p: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """An OCI artifact with a 50 MiB raw weights layer (custom media type, uncompressed)."""
    return build_model_artifact(tmp_path_factory.mktemp("small-model"), 50 * MiB,
                                extra_files={"tokenizer.json": 32 * 1024})


# seed / pull ------------------------------------------------------------------------

def test_seed_index_all_platforms_then_reseed_fetches_nothing(
        agent_factory: Callable[..., Agent], registry_anon: Registry, multiplatform_image: Layout,
        pushed: Callable[..., Pushed]) -> None:
    p = pushed(registry_anon, multiplatform_image, "ops/multi")
    agent = agent_factory(registry_anon, default=registry_anon, **swarm_ports())
    want = {b.digest: b.size for b in multiplatform_image.all_blobs()}

    first = cli_json("seed", p.ref, "--all-platforms", "--agent", agent.url)
    assert first["digest"] == p.digest
    assert first["blobs"] == len(want) and first["bytes"] == sum(want.values())
    assert first["by_source"]["upstream"] == sum(want.values())
    assert first["by_source"]["local"] == 0
    assert sorted(first["platforms"]) == ["linux/amd64", "linux/arm64"]
    assert first["manifests"] == 3 and first["pinned"] == p.ref
    assert all(stored(agent, digest) for digest in want)

    upstream_before = agent.metric(UPSTREAM_BLOB_BYTES, kind="blob")
    mark = registry_anon.access_log.mark()
    again = cli_json("seed", p.ref, "--all-platforms", "--agent", agent.url)
    assert again["by_source"] == {"local": sum(want.values()), "upstream": 0, "peer": 0}
    assert agent.metric(UPSTREAM_BLOB_BYTES, kind="blob") == upstream_before
    assert registry_anon.access_log.blob_bytes(mark) == 0

    status = cli_json("status", "--agent", agent.url)
    pins = {pin["label"]: pin for pin in status["pins"]}
    assert pins[p.ref]["present"] == pins[p.ref]["digests"] == len(want) + 3
    assert status["store"]["pinned_bytes"] >= sum(want.values())


def test_pull_selects_platform_and_does_not_pin(
        agent_factory: Callable[..., Agent], registry_anon: Registry, multiplatform_image: Layout,
        pushed: Callable[..., Pushed]) -> None:
    p = pushed(registry_anon, multiplatform_image, "ops/multi")
    agent = agent_factory(registry_anon, default=registry_anon, **swarm_ports())
    arm = multiplatform_image.images["linux/arm64"]
    summary = cli_json("pull", p.ref, "--platform", "linux/arm64", "--agent", agent.url)
    assert summary["platforms"] == ["linux/arm64"] and summary["pinned"] is None
    assert summary["blobs"] == len(arm.blobs) and summary["bytes"] == arm.blob_bytes
    amd = multiplatform_image.images["linux/amd64"]
    assert not any(stored(agent, b.digest) for b in amd.layers)
    assert cli_json("status", "--agent", agent.url)["pins"] == []

    from fleetp2p.admin.resolve import host_platform
    default = cli_json("pull", p.ref, "--agent", agent.url)  # no --platform: the agent's own
    assert default["platforms"] == [str(host_platform())]

    quiet = cli("pull", "-q", p.digest_ref.replace(f"@{p.digest}", f":{p.tag}"), "--platform",
                "linux/arm64", "--agent", agent.url)
    assert quiet.returncode == 0 and quiet.stdout.strip() == f"{p.registry_host}/ops/multi@{p.digest}"


def test_seed_model_artifact_through_token_auth(
        agent_factory: Callable[..., Agent], registry_token: Registry, small_model: Layout,
        pushed: Callable[..., Pushed]) -> None:
    """An artifact (artifactType, custom layer types, one big raw layer) from a Bearer-auth
    registry; the stored weights hash to their digest."""
    p = pushed(registry_token, small_model, "models/tiny")
    agent = agent_factory(registry_token, default=registry_token, **swarm_ports())
    summary = cli_json("seed", p.ref, "--agent", agent.url)
    assert summary["artifact_type"] == MODEL_ARTIFACT_TYPE
    blobs = small_model.all_blobs()
    assert summary["blobs"] == len(blobs) and summary["bytes"] == sum(b.size for b in blobs)
    weights = max(blobs, key=lambda b: b.size)
    upstream_before = agent.metric(UPSTREAM_BLOB_BYTES, kind="blob")
    body = mirror_get(agent, registry_token, "models/tiny", weights.digest)
    assert f"sha256:{hashlib.sha256(body).hexdigest()}" == weights.digest
    assert agent.metric(UPSTREAM_BLOB_BYTES, kind="blob") == upstream_before
    assert agent.served_bytes("local") == weights.size

    unpinned = cli_json("seed", "--unpin", p.ref, "--agent", agent.url)
    assert unpinned["unpinned"] == p.ref
    assert cli_json("status", "--agent", agent.url)["pins"] == []


def test_unpinned_blobs_are_evicted_pinned_stay(
        tmp_path: Path, agent_factory: Callable[..., Agent], registry_anon: Registry,
        pushed: Callable[..., Pushed]) -> None:
    """Store limit 8 MiB (GC above 7.6 MiB down to 6.8 MiB), images of one 3 MiB layer each."""
    images = {name: build_image(tmp_path / name, [3 * MiB], tag=name) for name in "abcd"}
    refs = {name: pushed(registry_anon, layout, f"gc/{name}").ref for name, layout in images.items()}
    layer = {name: layout.image.layers[0].digest for name, layout in images.items()}
    agent = agent_factory(registry_anon, default=registry_anon, store_max_size="8MiB",
                          **swarm_ports())

    cli_json("seed", refs["a"], "--agent", agent.url)
    cli_json("pull", refs["b"], "--agent", agent.url)
    cli_json("pull", refs["c"], "--agent", agent.url)  # over the watermark: GC takes b, not a
    assert stored(agent, layer["a"]), "a pinned blob was evicted"
    assert not stored(agent, layer["b"]), "the unpinned blob was not evicted"
    assert stored(agent, layer["c"])

    cli_json("seed", "--unpin", refs["a"], "--agent", agent.url)
    cli_json("pull", refs["d"], "--agent", agent.url)
    assert not stored(agent, layer["a"]), "unpinned a should be evicted now"
    assert stored(agent, layer["d"])
    assert agent.metric("fleetp2p_store_evictions_total") >= 2


# errors ------------------------------------------------------------------------------

def test_errors_are_one_line_with_exit_codes(
        agent_factory: Callable[..., Agent], registry_anon: Registry, small_image: Layout,
        multiplatform_image: Layout, pushed: Callable[..., Pushed]) -> None:
    p = pushed(registry_anon, small_image, "ops/small")
    multi = pushed(registry_anon, multiplatform_image, "ops/multi")
    agent = agent_factory(registry_anon, default=registry_anon, **swarm_ports())
    assert_one_line_error(cli("pull", "UPPER/Case:tag", "--agent", agent.url), 2, "invalid reference")
    assert_one_line_error(cli("seed", f"{registry_anon.host}/ops/small:nope", "--agent", agent.url),
                          1, "not found")
    assert_one_line_error(cli("pull", f"{registry_anon.host}/ops/absent:v1", "--agent", agent.url),
                          1, "not found")
    assert_one_line_error(cli("pull", multi.ref, "--platform", "linux/s390x", "--agent", agent.url),
                          1, "no manifest for platform linux/s390x", "linux/amd64, linux/arm64")
    assert_one_line_error(cli("pull", p.ref, "--platform", "amd64", "--agent", agent.url),
                          2, "invalid platform")
    assert_one_line_error(cli("seed", "--unpin", p.ref, "--agent", agent.url), 1, "not pinned")
    dead = f"http://127.0.0.1:{free_port()}"
    assert_one_line_error(cli("pull", p.ref, "--agent", dead), 1, "cannot reach the agent", dead)
    assert_one_line_error(cli("status", "--agent", dead), 1, "cannot reach the agent")
    usage = cli("pull")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    debug = cli("--debug", "status", "--agent", dead)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_status_text_shows_store_and_swarm_placeholders(
        agent_factory: Callable[..., Agent], registry_anon: Registry, small_image: Layout,
        pushed: Callable[..., Pushed]) -> None:
    """Without a swarm (tracker = "none") its fields are n/a; with the default embedded
    tracker they are filled in."""
    p = pushed(registry_anon, small_image, "ops/small")
    agent = agent_factory(registry_anon, default=registry_anon, tracker="none")
    cli_json("seed", p.ref, "--agent", agent.url)
    result = cli("status", "--agent", agent.url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "store" in out and "high watermark" in out and p.ref in out
    assert "tracker n/a, peers n/a, peer port n/a" in " ".join(out.split())
    data = cli_json("status", "--agent", agent.url)
    assert data["store"]["blobs"] == len(small_image.image.blobs) + 1
    assert data["served_bytes"]["upstream"] == 0  # a seed stores; it serves no client
    assert data["upstream"]["errors"] == {}
    assert data["swarm"]["peers"] is None and data["swarm"]["enabled"] is False
    assert data["version"] and data["cli_version"]

    swarming = agent_factory(registry_anon, default=registry_anon, **swarm_ports())
    data = cli_json("status", "--agent", swarming.url)
    assert data["swarm"]["enabled"] is True and data["swarm"]["tracker_url"]
    assert isinstance(data["swarm"]["tracker_reachable"], bool)


# the live display, in a real terminal ---------------------------------------------------

@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_pull_progress_display_in_tmux(
        tmp_path: Path, agent_factory: Callable[..., Agent], registry_anon: Registry,
        small_model: Layout, pushed: Callable[..., Pushed]) -> None:
    p = pushed(registry_anon, small_model, "models/tiny")
    agent = agent_factory(registry_anon, default=registry_anon, **swarm_ports())
    socket_name = f"fleetp2p-test-{os.getpid()}-{free_port()}"
    tmux = ["tmux", "-L", socket_name]
    command = (f"cd {REPO_ROOT} && {sys.executable} -m fleetp2p pull {p.ref} --agent {agent.url}; "
               "echo EXIT=$?; sleep 60")
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("TMUX", None)
    subprocess.run([*tmux, "new-session", "-d", "-x", "120", "-y", "40", "-s", "pull", command],
                   check=True, env=env, timeout=10)
    try:
        frames: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pane = subprocess.run([*tmux, "capture-pane", "-p", "-t", "pull"], capture_output=True,
                                  text=True, timeout=10).stdout
            frames.append(pane)
            if "EXIT=" in pane:
                break
            time.sleep(0.05)
        final = frames[-1]
        assert "EXIT=0" in final, final
        assert "pulled " + p.ref in final, final
        assert "MiB from upstream" in final and "0 B already local" in final, final
        # the rich bar stays on screen at its final state: the whole artifact done
        total = sum(b.size for b in small_model.all_blobs()) / MiB
        assert any(line.startswith("total") and f"{total:.1f}/{total:.1f} MiB" in line
                   for line in final.splitlines()), final
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)


# admin API guards and failure handling, in process ---------------------------------------

def _fake_remote_middleware() -> Callable:
    """Lets a test claim a peer address, as a reverse proxy's `clone(remote=)` would."""
    @web.middleware
    async def middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
        remote = request.headers.get("X-Test-Remote")
        return await handler(request.clone(remote=remote) if remote else request)
    return middleware


@pytest.mark.parametrize("allow_remote", [False, True])
async def test_admin_api_refuses_non_loopback_peers(tmp_path: Path, allow_remote: bool) -> None:
    upstream = FakeUpstream()
    async with running(upstream.app()) as up:
        from fleetp2p import config as config_mod
        from fleetp2p.agent import Agent as InProcessAgent
        name = f"127.0.0.1:{up.port}"
        cfg = config_mod.from_dict({"data_dir": str(tmp_path), "admin_allow_remote": allow_remote,
                                    "tracker": "none",
                                    "registries": [{"name": name, "url": f"http://{name}"}]})
        agent = InProcessAgent(cfg.validate())
        app = agent.build_app()
        app.middlewares.insert(0, _fake_remote_middleware())
        async with running(app) as server, aiohttp.ClientSession() as session:
            url = server.make_url("/_fleetp2p/v1/status")
            async with session.get(url, headers={"X-Test-Remote": "192.0.2.7"}) as resp:
                assert resp.status == (200 if allow_remote else 403)
                if not allow_remote:
                    assert "admin_allow_remote" in (await resp.json())["error"]
            async with session.get(url, headers={"X-Test-Remote": "::ffff:127.0.0.1"}) as resp:
                assert resp.status == 200
            async with session.get(url) as resp:
                assert resp.status == 200
            # the OCI mirror itself is for everyone who can reach the listener
            async with session.get(server.make_url("/v2/"),
                                   headers={"X-Test-Remote": "192.0.2.7"}) as resp:
                assert resp.status == 200


async def test_failed_seed_reports_error_and_restores_pins(tmp_path: Path) -> None:
    """A layer that fails verification ends the stream with an `error` event and the
    seed leaves no pin behind."""
    upstream = FakeUpstream()
    layer = upstream.add_blob(os.urandom(256 * 1024))
    config = upstream.add_blob(b"{}")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": config, "size": 2},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": layer, "size": 256 * 1024}]}).encode()
    upstream.manifests["v1"] = (manifest, "application/vnd.oci.image.manifest.v1+json")
    upstream.faults = ["corrupt"] * 8
    async with running(upstream.app()) as up, \
            agent_for(up, tmp_path, upstream_retries=1) as (agent, server):
        async with aiohttp.ClientSession() as session:
            body = {"ref": f"127.0.0.1:{up.port}/app:v1", "pin": True}
            async with session.post(server.make_url("/_fleetp2p/v1/pull"), json=body) as resp:
                assert resp.status == 200
                events = [json.loads(line) for line in (await resp.read()).splitlines()]
            assert events[0]["event"] == "resolved"
            assert events[-1]["event"] == "error" and "hash to" in events[-1]["message"]
            assert agent.store.pins() == {}
            async with session.post(server.make_url("/_fleetp2p/v1/pull"), data=b"nope") as resp:
                assert resp.status == 400


async def test_client_disconnect_aborts_seed_and_restores_pins(tmp_path: Path) -> None:
    """Ctrl-C on `fleetp2p seed` closes the stream: the agent drops the seed's pin
    (the blob download itself carries on in the fetcher and lands in the store)."""
    upstream = FakeUpstream()
    layer = upstream.add_blob(os.urandom(2 * MiB))
    config = upstream.add_blob(b"{}")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": config, "size": 2},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": layer, "size": 2 * MiB}]}).encode()
    upstream.manifests["v1"] = (manifest, "application/vnd.oci.image.manifest.v1+json")
    upstream.faults = ["slow", "slow"]  # ~0.6 s per blob
    async with running(upstream.app()) as up, agent_for(up, tmp_path) as (agent, server):
        async with aiohttp.ClientSession() as session:
            body = {"ref": f"127.0.0.1:{up.port}/app:v1", "pin": True}
            async with session.post(server.make_url("/_fleetp2p/v1/pull"), json=body) as resp:
                first = json.loads(await resp.content.readline())
                assert first["event"] == "resolved" and first["pin"] == body["ref"]
                assert list(agent.store.pins()) == [body["ref"]]
                resp.close()
        deadline = time.monotonic() + 5
        while agent.store.pins() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert agent.store.pins() == {}
