"""`fleetp2p doctor` on a healthy setup and on each broken one, against a real agent,
real registries (anonymous and Bearer-token), a real tracker process and temp
containerd config files; plus the individual check functions."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from harness.agent import Agent, UpstreamEntry, render_config
from harness.containerd import write_hosts_dir
from harness.images import Layout, Pushed
from harness.ports import LOOPBACK, free_port, wait_http
from harness.process import ManagedProcess
from harness.registry import Registry

from fleetp2p.cli import checks
from fleetp2p.cli.checks import Check
from fleetp2p.cli.registriesconf import check_registries_conf

REPO_ROOT = Path(__file__).resolve().parents[1]


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetp2p", "doctor", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO_ROOT)


def lines_by_status(out: str) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {"PASS": [], "FAIL": [], "SKIP": []}
    for line in out.splitlines():
        mark = line[:4]
        if mark in result:
            result[mark].append(line)
    return result


def containerd_config(tmp_path: Path, hosts_dir: Path | None, version: int = 2) -> Path:
    path = tmp_path / f"containerd-{version}.toml"
    plugin = "io.containerd.grpc.v1.cri" if version == 2 else "io.containerd.cri.v1.images"
    text = f"version = {version}\n"
    if hosts_dir is not None:
        text += f'\n[plugins."{plugin}".registry]\n  config_path = "{hosts_dir}"\n'
    path.write_text(text)
    return path


def swarm_ports() -> dict[str, str]:
    """Free ports for the embedded tracker and the peer listener of one test agent."""
    return {"tracker_listen": f"{LOOPBACK}:{free_port()}", "peer_listen": f"{LOOPBACK}:{free_port()}"}


@pytest.fixture
def setup(tmp_path: Path, agent_factory: Callable[..., Agent], registry_anon: Registry,
          registry_token: Registry) -> tuple[Agent, Path, list[Registry]]:
    """A swarm-enabled agent for two upstreams (one with token auth) and a containerd
    config whose hosts dir routes both through it."""
    regs = [registry_anon, registry_token]
    agent = agent_factory(*regs, default=registry_anon, **swarm_ports())
    hosts = tmp_path / "certs.d"
    for reg in regs:
        write_hosts_dir(hosts, reg.host, reg.url, agent.url)
    return agent, containerd_config(tmp_path, hosts), regs


def test_healthy_setup_passes(setup: tuple[Agent, Path, list[Registry]]) -> None:
    agent, ctr_config, regs = setup
    result = doctor("--config", str(agent.config_path), "--containerd-config", str(ctr_config))
    assert result.returncode == 0, result.stdout + result.stderr
    found = lines_by_status(result.stdout)
    assert found["FAIL"] == [] and found["SKIP"] == [], result.stdout
    names = " ".join(found["PASS"])
    for expected in ("config", "data dir", "agent", "tracker", "peer port", "containerd config",
                     "store", *(f"hosts.toml {r.host}" for r in regs),
                     *(f"upstream {r.host}" for r in regs)):
        assert expected in names, (expected, result.stdout)
    assert any(f"upstream {regs[1].host}" in line and "authenticated" in line for line in found["PASS"])
    assert "passed, 0 failed" in result.stdout


def test_missing_hosts_toml_is_reported_with_fix(tmp_path: Path,
                                                 setup: tuple[Agent, Path, list[Registry]]) -> None:
    agent, _, regs = setup
    empty = tmp_path / "empty-certs.d"
    empty.mkdir()
    result = doctor("--config", str(agent.config_path),
                    "--containerd-config", str(containerd_config(tmp_path, empty)))
    assert result.returncode == 1
    failed = lines_by_status(result.stdout)["FAIL"]
    assert len(failed) == len(regs), result.stdout
    for reg, line in zip(regs, failed):
        assert f"hosts.toml {reg.host}" in line and "fix: write" in line and agent.url in line
    # --hosts-dir overrides containerd's config_path
    good = doctor("--config", str(agent.config_path), "--containerd-config",
                  str(containerd_config(tmp_path, empty)), "--hosts-dir", str(tmp_path / "certs.d"))
    assert good.returncode == 0, good.stdout


def test_containerd_without_config_path(tmp_path: Path, setup: tuple[Agent, Path, list[Registry]]) -> None:
    agent, _, _ = setup
    result = doctor("--config", str(agent.config_path),
                    "--containerd-config", str(containerd_config(tmp_path, None)))
    assert result.returncode == 1
    failed = lines_by_status(result.stdout)["FAIL"]
    assert any(line.startswith("FAIL  containerd config") and "config_path" in line and "fix:" in line
               for line in failed), result.stdout


def test_unreachable_and_unauthenticated_upstreams(
        tmp_path: Path, agent_factory: Callable[..., Agent], registry_anon: Registry,
        registry_token: Registry) -> None:
    agent = agent_factory(registry_anon, default=registry_anon, tracker="none")
    dead = f"{LOOPBACK}:{free_port()}"
    entries = [UpstreamEntry(registry_anon.host, registry_anon.url),
               UpstreamEntry(dead, f"http://{dead}"),
               UpstreamEntry(registry_token.host, registry_token.url, registry_token.username, "wrong")]
    config = tmp_path / "doctor.toml"
    config.write_text(render_config({"listen": agent.host, "data_dir": str(agent.data_dir),
                                     "default_registry": registry_anon.host, "tracker": "none"},
                                    entries))
    hosts = tmp_path / "certs.d"
    for entry in entries:
        write_hosts_dir(hosts, entry.name, entry.url, agent.url)
    result = doctor("--config", str(config), "--containerd-config", str(containerd_config(tmp_path, hosts)))
    assert result.returncode == 1
    found = lines_by_status(result.stdout)
    failed = found["FAIL"]
    assert len(failed) == 2, result.stdout
    assert f"upstream {dead}" in failed[0] and "connection refused" in failed[0]
    assert "fix: check url of [[registries]]" in failed[0]
    assert f"upstream {registry_token.host}" in failed[1] and "refused the credentials" in failed[1]
    assert "fix: set username/password" in failed[1]
    assert any(line.startswith("SKIP  tracker") and "skipped: no tracker configured" in line
               for line in found["SKIP"]), result.stdout


def test_store_above_high_watermark(
        tmp_path: Path, agent_factory: Callable[..., Agent], registry_anon: Registry,
        small_image: Layout, pushed: Callable[..., Pushed]) -> None:
    """A pinned seed larger than the store: GC cannot help, doctor must say so."""
    p = pushed(registry_anon, small_image, "doctor/small")
    agent = agent_factory(registry_anon, default=registry_anon, store_max_size="4MiB", tracker="none")
    seeded = subprocess.run([sys.executable, "-m", "fleetp2p", "seed", "-q", p.ref, "--agent", agent.url],
                            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert seeded.returncode == 0, seeded.stderr
    hosts = tmp_path / "certs.d"
    write_hosts_dir(hosts, registry_anon.host, registry_anon.url, agent.url)
    result = doctor("--config", str(agent.config_path), "--containerd-config",
                    str(containerd_config(tmp_path, hosts)))
    assert result.returncode == 1
    failed = lines_by_status(result.stdout)["FAIL"]
    assert len(failed) == 1 and failed[0].startswith("FAIL  store"), result.stdout
    assert "above the high watermark" in failed[0] and "fleetp2p seed --unpin" in failed[0]


def test_agent_down(tmp_path: Path, setup: tuple[Agent, Path, list[Registry]]) -> None:
    agent, ctr_config, _ = setup
    agent.stop()
    result = doctor("--config", str(agent.config_path), "--containerd-config", str(ctr_config),
                    "--json")
    assert result.returncode == 1
    import json
    report = json.loads(result.stdout)
    by_name = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is False
    assert by_name["agent"]["status"] == "fail" and "connection refused" in by_name["agent"]["detail"]
    assert "fleetp2p agent" in by_name["agent"]["fix"]
    assert by_name["tracker"]["status"] == "fail"  # the embedded tracker went down with it
    assert by_name["store"]["status"] == "pass"  # measured on disk instead


def test_bad_config_fails_first(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('store_max_size = "lots"\n')
    result = doctor("--config", str(config), "--agent", f"http://{LOOPBACK}:{free_port()}",
                    "--containerd-config", str(tmp_path / "none.toml"))
    assert result.returncode == 1
    first = result.stdout.splitlines()[0]
    assert first.startswith("FAIL  config") and "store_max_size" in first and "fix:" in first


# The check functions on their own ------------------------------------------------------

@pytest.fixture
def tracker_with_token(tmp_path: Path) -> Iterator[str]:
    """A standalone tracker process requiring a bearer token."""
    port = free_port()
    process = ManagedProcess([sys.executable, "-m", "tracker", "--listen", f"{LOOPBACK}:{port}",
                              "--token", "s3cret"], stdout=tmp_path / "tracker.out",
                             stderr=tmp_path / "tracker.err", cwd=REPO_ROOT).start()
    try:
        url = f"http://{LOOPBACK}:{port}"
        wait_http(f"{url}/healthz", timeout=15, alive=process.alive)
        yield url
    finally:
        process.stop()


def test_tracker_check(tracker_with_token: str) -> None:
    url = tracker_with_token
    assert checks.check_tracker(url, "s3cret").status == checks.PASS
    wrong = checks.check_tracker(url, "nope")
    assert wrong.status == checks.FAIL and "tracker_token" in (wrong.fix or "")
    assert checks.check_tracker(url, None).status == checks.FAIL
    down = checks.check_tracker(f"http://{LOOPBACK}:{free_port()}", "s3cret")
    assert down.status == checks.FAIL and "connection refused" in down.detail
    skipped = checks.check_tracker(None, None)
    assert skipped.status == checks.SKIP and skipped.detail == "skipped: no tracker configured"


def test_peer_port_check() -> None:
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert checks.check_peer_port(f"0.0.0.0:{port}").status == checks.PASS
    assert checks.check_peer_port(f"{LOOPBACK}:{free_port()}").status == checks.FAIL
    assert checks.check_peer_port(None).status == checks.SKIP


def test_containerd_config_versions(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    for version in (2, 3):
        check, config_path = checks.check_containerd_config(str(containerd_config(tmp_path, hosts, version)))
        assert check.status == checks.PASS and config_path == str(hosts)
    missing, _ = checks.check_containerd_config(str(tmp_path / "absent.toml"))
    assert missing.status == checks.FAIL and "does not exist" in missing.detail
    (tmp_path / "broken.toml").write_text("version = \n")
    broken, _ = checks.check_containerd_config(str(tmp_path / "broken.toml"))
    assert broken.status == checks.FAIL


def test_hosts_toml_matching(tmp_path: Path) -> None:
    agent_url = "http://127.0.0.1:5050"
    write_hosts_dir(tmp_path, "_default", "https://example.invalid", "http://localhost:5050")
    assert checks.check_hosts_toml(str(tmp_path), "ghcr.io", agent_url).status == checks.PASS
    write_hosts_dir(tmp_path, "docker.io", "https://registry-1.docker.io", "http://127.0.0.1:5999")
    other_port = checks.check_hosts_toml(str(tmp_path), "docker.io", agent_url)
    assert other_port.status == checks.FAIL and "does not name the agent" in other_port.detail
    write_hosts_dir(tmp_path, "quay.io", "https://quay.io", agent_url, capabilities=("resolve",))
    no_pull = checks.check_hosts_toml(str(tmp_path), "quay.io", agent_url)
    assert no_pull.status == checks.FAIL and "pull" in no_pull.detail


def test_registries_conf_entries_that_go_to_the_agent(tmp_path: Path) -> None:
    """Each [[registry]] mirrored through the agent must name its registry in the
    mirror's path, unless it is the default registry; drop-ins override the file."""
    agent_url = "http://127.0.0.1:5050"
    conf = tmp_path / "registries.conf"
    conf.write_text(
        '[[registry]]\nprefix = "docker.io"\nlocation = "registry-1.docker.io"\n'
        '[[registry.mirror]]\nlocation = "127.0.0.1:5050"\ninsecure = true\n'
        '[[registry]]\nlocation = "ghcr.io"\n'
        '[[registry.mirror]]\nlocation = "localhost:5050/ghcr.io"\ninsecure = true\n'
        '[[registry]]\nlocation = "quay.io"\n'
        '[[registry.mirror]]\nlocation = "127.0.0.1:5050"\ninsecure = true\n'
        '[[registry]]\nlocation = "gcr.io"\n'
        '[[registry.mirror]]\nlocation = "127.0.0.1:5050/gcr.io"\n'
        '[[registry]]\nlocation = "elsewhere.io"\n'
        '[[registry.mirror]]\nlocation = "mirror.example:5000"\n')
    (tmp_path / "registries.conf.d").mkdir()
    (tmp_path / "registries.conf.d" / "50-fix.conf").write_text(
        '[[registry]]\nlocation = "quay.io"\n'
        '[[registry.mirror]]\nlocation = "127.0.0.1:5050/ghcr.io"\ninsecure = true\n')

    def by_prefix(default: str = "docker.io", in_path: bool = True) -> dict[str, Check]:
        found = check_registries_conf(str(conf), agent_url, default, in_path)
        return {c.name.removeprefix("registries.conf "): c for c in found}

    found = by_prefix()
    assert set(found) == {"docker.io", "ghcr.io", "quay.io", "gcr.io"}, "elsewhere.io is no mirror of ours"
    assert found["docker.io"].status == checks.PASS and "default registry" in found["docker.io"].detail
    assert found["ghcr.io"].status == checks.PASS
    assert found["quay.io"].status == checks.FAIL and "the entry is for quay.io" in found["quay.io"].detail
    assert found["quay.io"].fix == 'set the mirror\'s location = "127.0.0.1:5050/quay.io"'
    assert found["gcr.io"].status == checks.FAIL and "insecure = true" in (found["gcr.io"].fix or "")
    on_ghcr = by_prefix(default="ghcr.io")["docker.io"]
    assert on_ghcr.status == checks.FAIL and on_ghcr.fix == \
        'set the mirror\'s location = "127.0.0.1:5050/registry-1.docker.io"'
    off = by_prefix(in_path=False)["ghcr.io"]
    assert off.status == checks.FAIL and "registry_in_path" in off.detail

    (tmp_path / "empty.conf").write_text("")
    assert check_registries_conf(str(tmp_path / "empty.conf"), agent_url, "docker.io", True)[0].status == checks.FAIL
    missing, = check_registries_conf(str(tmp_path / "nowhere.conf"), agent_url, "docker.io", True)
    assert missing.status == checks.FAIL and "does not exist" in missing.detail
    (tmp_path / "odd.conf").write_text('[[registry]]\nlocation = "quay.io"\nmirror = ["127.0.0.1:5050"]\n')
    odd, = check_registries_conf(str(tmp_path / "odd.conf"), agent_url, "docker.io", True)
    assert odd.status == checks.FAIL and "points at the agent" in odd.detail
    (tmp_path / "broken.conf").write_text("[[registry]\n")
    broken, = check_registries_conf(str(tmp_path / "broken.conf"), agent_url, "docker.io", True)
    assert broken.status == checks.FAIL and "TOML" in (broken.fix or "")
