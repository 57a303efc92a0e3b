"""deploy/ against real software.

- Ansible: `ansible-lint` is clean; `site.yml` runs for real against this machine
  (`-c local`, services started as plain commands, every path under a temp
  prefix): a tracker and an agent installed from a wheel of this checkout,
  containerd's hosts.toml files and config.toml written with backups, a real `ctr`
  pull through the agent; a second run changes nothing; a host that fails its
  gate stops the rollout; `rollback.yml` restores the original files.
- Prometheus: promtool loads the alert rules and runs their unit tests; a real
  Prometheus, with the example scrape config, scrapes a real tracker and three
  real agents (two swarming through it after real pulls, one cut off from its
  tracker), and every query of every Grafana panel returns data: a panel whose
  metric the code does not export fails the suite.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import math
import os
import grp
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import pytest
import yaml

from harness.agent import Agent, metric_sum, parse_metrics
from harness.containerd import Containerd
from harness.images import Layout, Pushed, build_image
from harness.ports import LOOPBACK, free_port, wait_http
from harness.process import ManagedProcess, pid_alive, run
from harness.registry import Registry

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
ANSIBLE_DIR = DEPLOY / "ansible"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"

# Labels a dashboard may group or filter by: all bounded (never a digest, repository or peer).
BOUNDED_LABELS = {"job", "instance", "source", "kind", "status", "reason", "endpoint", "method", "code", "op",
                  "le", "winner"}

# Debian 12's /etc/containerd/config.toml: version 2, no registry table yet.
DEBIAN_CONTAINERD_CONFIG = """version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""


# --- Tools and processes -----------------------------------------------------------

def _tool(name: str, package: str) -> str:
    """A program from this interpreter's environment or PATH; fails (never skips) without it."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install {package}")
    return found


def _pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line contains `marker` (a temp dir unique to one test)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def _kill_started_under(marker: str) -> None:
    """Stop what a role started in command mode: processes whose command line names our temp dir."""
    pids = _pids_mentioning(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.05)
        pids = [p for p in pids if pid_alive(p)]
        if not pids:
            return


def _pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _http_status(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((LOOPBACK, port)) == 0


# --- Ansible ------------------------------------------------------------------------------

_RECAP = re.compile(r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
                    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)", re.M)


def _recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host (the last recap wins)."""
    return {m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
            for m in _RECAP.finditer(output)}


def _playbook(playbook: str, inventory: Path, *args: str, check: bool = True,
              timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_STDOUT_CALLBACK": "default",
           "ANSIBLE_DISPLAY_SKIPPED_HOSTS": "false", "ANSIBLE_RETRY_FILES_ENABLED": "false"}
    argv = [_tool("ansible-playbook", "ansible-core"), "-i", str(inventory), str(ANSIBLE_DIR / playbook), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ANSIBLE_DIR)
    if check and result.returncode != 0:
        pytest.fail(f"ansible-playbook {playbook} {' '.join(args)} exited {result.returncode}:\n"
                    f"{result.stdout[-12000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def fleetp2p_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout, built from a clean copy (no stale build/ from the work tree)."""
    src = tmp_path_factory.mktemp("wheel-src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fleetp2p", "tracker"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--disable-pip-version-check",
         "-w", str(out), str(src)], timeout=300)
    (wheel,) = out.glob("fleetp2p-*.whl")
    return wheel


@pytest.fixture(scope="module")
def app_image(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """A second small image, pulled by the tests themselves (the role's gate pulls `small_image`)."""
    return build_image(tmp_path_factory.mktemp("app-image"), [MiB, 3 * MiB], tag="app")


@pytest.fixture(scope="module")
def wide_image(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """Three 8 MiB layers: cold blobs for concurrent requests that must coalesce."""
    return build_image(tmp_path_factory.mktemp("wide-image"), [8 * MiB] * 3, tag="wide")


def test_ansible_lint_is_clean() -> None:
    result = subprocess.run([_tool("ansible-lint", "ansible-lint"), "--nocolor"], capture_output=True,
                            text=True, timeout=170, cwd=ANSIBLE_DIR,
                            env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0, f"ansible-lint:\n{result.stdout[-8000:]}\n{result.stderr[-8000:]}"


@dataclass
class Machine:
    """One simulated host: everything the roles write lives under `prefix`."""

    prefix: Path
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def certs(self) -> Path:
        return self.prefix / "etc/containerd/certs.d"

    @property
    def containerd_config(self) -> Path:
        return self.prefix / "etc/containerd/config.toml"

    @property
    def registries_conf(self) -> Path:
        return self.prefix / "etc/containers/registries.conf.d/50-fleetp2p.conf"

    @property
    def agent_toml(self) -> Path:
        return self.prefix / "etc/fleetp2p/agent.toml"

    def backup_of(self, path: Path) -> Path:
        return Path(f"{self.prefix}/var/backups/fleetp2p/files{path}")

    def agent_vars(self, registry: Registry, smoke: Pushed, **extra: Any) -> dict[str, Any]:
        """The agent's inventory variables; each agent gets its own ports (they share this machine)."""
        return {"fleetp2p_prefix": str(self.prefix), "fleetp2p_agent_listen": f"{LOOPBACK}:{self.port}",
                "fleetp2p_agent_peer_listen": f"{LOOPBACK}:{free_port()}",
                "fleetp2p_agent_peer_http_listen": f"{LOOPBACK}:{free_port()}",
                "fleetp2p_agent_registries": [{"name": registry.host, "url": registry.url}],
                "fleetp2p_agent_smoke_registry": registry.host,
                "fleetp2p_agent_smoke_repository": smoke.repo, "fleetp2p_agent_smoke_reference": smoke.tag,
                **extra}


def _common_vars(wheel: Path, venv: Path, tracker_url: str, token: str, restart_script: Path) -> dict[str, Any]:
    """Variables of every host: run as this user, services as plain commands, one shared venv."""
    user, group = pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name
    return {
        "ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}",
        "fleetp2p_become": False,
        "fleetp2p_agent_user": user, "fleetp2p_agent_group": group,
        "fleetp2p_agent_service_mode": "command", "fleetp2p_agent_install_unit": True,
        "fleetp2p_agent_package_file": str(wheel), "fleetp2p_agent_python": sys.executable,
        # Byte-compiling every dependency costs more than the rest of the install.
        "fleetp2p_agent_venv": str(venv), "fleetp2p_agent_pip_extra_args": "--no-compile",
        "fleetp2p_agent_store_max_size": "1GiB",
        "fleetp2p_agent_log_level": "debug", "fleetp2p_agent_registries_conf": True,
        "fleetp2p_agent_registries_conf_mirrors": ["{{ fleetp2p_agent_effective_default_registry }}",
                                                   "ghcr.io"],
        "fleetp2p_agent_tracker": tracker_url, "fleetp2p_agent_tracker_token": token,
        "fleetp2p_agent_containerd_restart_command": str(restart_script),
        "fleetp2p_agent_health_retries": 50, "fleetp2p_agent_health_delay": 0.2,
        "fleetp2p_tracker_user": user, "fleetp2p_tracker_group": group,
        "fleetp2p_tracker_service_mode": "command", "fleetp2p_tracker_install_unit": True,
        "fleetp2p_tracker_package_file": str(wheel), "fleetp2p_tracker_python": sys.executable,
        "fleetp2p_tracker_venv": str(venv), "fleetp2p_tracker_pip_extra_args": "--no-compile",
        "fleetp2p_tracker_token": token,
        "fleetp2p_tracker_health_retries": 50, "fleetp2p_tracker_health_delay": 0.2,
    }


def _check_units(units: Path, venv: Path, host: Machine) -> None:
    """The rendered units carry the hardening and parse with systemd's own checker."""
    agent_unit = (units / "fleetp2p-agent.service").read_text().splitlines()
    user = pwd.getpwuid(os.geteuid()).pw_name
    for line in ("Restart=on-failure", "LimitNOFILE=1048576", "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "CapabilityBoundingSet=", f"User={user}", f"ReadWritePaths={host.prefix}/var/lib/fleetp2p",
                 f"ExecStart={venv}/bin/fleetp2p agent --config {host.agent_toml}"):
        assert line in agent_unit, f"{line!r} missing from the agent's unit"
    tracker_unit = (units / "fleetp2p-tracker.service").read_text().splitlines()
    assert f"ExecStart={venv}/bin/fleetp2p tracker $FLEETP2P_TRACKER_ARGS" in tracker_unit
    if shutil.which("systemd-analyze"):
        # Syntax and directives only: users and network-online.target need not exist here.
        verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(units / "fleetp2p-agent.service"),
                                 str(units / "fleetp2p-tracker.service")], capture_output=True, text=True,
                                timeout=60)
        bad = [line for line in verify.stderr.splitlines()
               if any(word in line for word in ("Unknown key", "Unknown section", "Invalid", "Failed to parse"))]
        assert not bad, verify.stderr


def test_rollout_idempotent_gated_and_rolled_back(
        tmp_path: Path, fleetp2p_wheel: Path, registry_anon: Registry, small_image: Layout,
        app_image: Layout, pushed: Callable[[Registry, Layout, str], Pushed],
        containerd: Containerd) -> None:
    smoke = pushed(registry_anon, small_image, "deploy/smoke")
    app = pushed(registry_anon, app_image, "deploy/app")
    host = Machine(tmp_path / "host-1")             # the tracker and agent-1
    failing = Machine(tmp_path / "host-2")          # agent-2: its gate image does not exist
    later = Machine(tmp_path / "host-3")            # agent-3: a later batch, never reached
    tracker = Machine(tmp_path / "host-1")
    venv = tmp_path / "venv"                        # one install for every host keeps the test short
    token = "test-tracker-token"

    # What the operator had before: a hosts.toml for the registry, Debian's config.toml.
    original_hosts = (f'# before fleetp2p\nserver = "{registry_anon.url}"\n\n'
                      f'[host."{registry_anon.url}"]\n  capabilities = ["pull", "resolve"]\n')
    (host.certs / registry_anon.host).mkdir(parents=True)
    (host.certs / registry_anon.host / "hosts.toml").write_text(original_hosts)
    host.containerd_config.write_text(DEBIAN_CONTAINERD_CONFIG)
    restarts = tmp_path / "containerd-restarts.log"
    restart_script = tmp_path / "restart-containerd.sh"
    restart_script.write_text(f"#!/bin/sh\necho restart >> {restarts}\n")
    restart_script.chmod(0o755)

    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"all": {
        "vars": _common_vars(fleetp2p_wheel, venv, tracker.url, token, restart_script),
        "children": {
            "fleetp2p_trackers": {"hosts": {"tracker-1": {
                "fleetp2p_prefix": str(tracker.prefix), "fleetp2p_tracker_listen": f"{LOOPBACK}:{tracker.port}"}}},
            "fleetp2p_agents": {"hosts": {
                "agent-1": host.agent_vars(registry_anon, smoke, fleetp2p_agent_smoke_ctr=True,
                                           fleetp2p_agent_smoke_ctr_address=str(containerd.socket),
                                           fleetp2p_agent_registries=[
                                               {"name": registry_anon.host, "url": registry_anon.url},
                                               {"name": "direct.example:5000", "url": "http://127.0.0.1:9",
                                                "mirror": False}]),
                # The venv is agent-1's: only agent-1's rollback removes it.
                "agent-2": failing.agent_vars(registry_anon, smoke, fleetp2p_agent_purge=False,
                                              fleetp2p_agent_smoke_repository="deploy/not-pushed"),
                "agent-3": later.agent_vars(registry_anon, smoke, fleetp2p_agent_purge=False),
            }},
        }}}, indent=1))
    try:
        # 1. One agent per batch after the tracker: agent-1 passes its gate (a ctr pull through
        #    it), agent-2 fails its gate, so the rollout stops and agent-3 is never touched.
        first = _playbook("site.yml", inventory, "-e", "fleetp2p_serial=1", check=False)
        recap = _recap(first.stdout)
        assert first.returncode != 0 and recap["agent-2"]["failed"] == 1, first.stdout[-4000:]
        assert "deploy/not-pushed" in first.stdout, "agent-2 should fail at its gate"
        assert recap["tracker-1"]["failed"] == 0 and recap["agent-1"]["failed"] == 0, first.stdout[-8000:]
        assert recap["agent-1"]["changed"] > 0
        assert recap.get("agent-3", {}).get("ok", 0) == 0 and not later.prefix.exists()
        assert failing.agent_toml.exists()

        config = tomllib.loads(host.agent_toml.read_text())
        assert config["listen"] == f"{LOOPBACK}:{host.port}"
        assert config["data_dir"] == str(host.prefix / "var/lib/fleetp2p")
        assert config["default_registry"] == registry_anon.host and config["store_max_size"] == "1GiB"
        assert config["registries"] == [{"name": registry_anon.host, "url": registry_anon.url},
                                        {"name": "direct.example:5000", "url": "http://127.0.0.1:9"}]
        assert config["tracker"] == tracker.url and config["tracker_token"] == token
        assert "zone" not in config and "advertise_addr" not in config, "empty settings: the agent's defaults"

        registry_hosts = host.certs / registry_anon.host / "hosts.toml"
        hosts = tomllib.loads(registry_hosts.read_text())
        assert hosts["server"] == registry_anon.url
        assert hosts["host"] == {host.url: {"capabilities": ["pull", "resolve"]}}
        direct = tomllib.loads((host.certs / "direct.example:5000/hosts.toml").read_text())
        assert direct == {"server": "http://127.0.0.1:9"}, "mirror: false must leave the agent out"
        default_hosts = tomllib.loads((host.certs / "_default/hosts.toml").read_text())
        assert "server" not in default_hosts and host.url in default_hosts["host"]
        assert host.backup_of(registry_hosts).read_text() == original_hosts
        assert Path(f"{host.backup_of(registry_hosts)}.fleetp2p-present").exists()
        assert Path(f"{host.backup_of(host.certs / '_default/hosts.toml')}.fleetp2p-absent").exists()

        ctrd = tomllib.loads(host.containerd_config.read_text())["plugins"]["io.containerd.grpc.v1.cri"]
        assert ctrd["registry"]["config_path"] == str(host.certs) and ctrd["cni"]["bin_dir"] == "/usr/lib/cni"
        assert restarts.read_text().count("restart") == 2   # agent-1, and agent-2 (no config.toml: written)
        assert tomllib.loads(host.registries_conf.read_text())["registry"] == [
            {"prefix": registry_anon.host, "location": registry_anon.host, "insecure": True,
             "mirror": [{"location": f"{LOOPBACK}:{host.port}", "insecure": True}]},  # a port: bare
            {"prefix": "ghcr.io", "location": "ghcr.io",
             "mirror": [{"location": f"{LOOPBACK}:{host.port}/ghcr.io", "insecure": True}]}]
        _check_units(host.prefix / "etc/systemd/system", venv, host)

        # Started by plain commands: the tracker (token on), the agent (announced to it).
        assert _http_status(f"{tracker.url}/healthz") == 200
        assert _http_status(f"{tracker.url}/v1/health") == 401, "the tracker's token is not in force"
        tracker_metrics = parse_metrics(_get_text(f"{tracker.url}/metrics"))
        assert metric_sum(tracker_metrics, "fleetp2p_tracker_announces_total") > 0, "the agent never announced"
        assert _http_status(f"{host.url}/v2/") == 200
        before = parse_metrics(_get_text(f"{host.url}/metrics"))
        assert metric_sum(before, "fleetp2p_served_bytes_total") >= small_image.image.blob_bytes, \
            "the gate's ctr pull did not go through the agent"
        # A real ctr pull through the hosts directory the role wrote.
        containerd.pull(app.ref, hosts_dir=host.certs)
        assert app.ref in containerd.image_names()
        after = parse_metrics(_get_text(f"{host.url}/metrics"))
        assert metric_sum(after, "fleetp2p_served_bytes_total", source="upstream") - \
            metric_sum(before, "fleetp2p_served_bytes_total", source="upstream") >= app_image.image.blob_bytes

        # 2. Idempotent: nothing changes, nothing restarts.
        agent_pid = _pid_from(host.prefix / "run/fleetp2p/agent.pid")
        second = _playbook("site.yml", inventory, "--limit", "tracker-1,agent-1")
        recap = _recap(second.stdout)
        assert {h: r["changed"] for h, r in recap.items()} == {"tracker-1": 0, "agent-1": 0}, second.stdout[-6000:]
        assert _pid_from(host.prefix / "run/fleetp2p/agent.pid") == agent_pid
        assert restarts.read_text().count("restart") == 2

        # 3. Rollback: services stopped and uninstalled, runtime files as they were.
        _playbook("rollback.yml", inventory)
        assert registry_hosts.read_text() == original_hosts
        assert not (host.certs / "_default").exists() and not (host.certs / "direct.example:5000").exists()
        assert host.containerd_config.read_text() == DEBIAN_CONTAINERD_CONFIG
        assert not host.registries_conf.exists()
        assert not (host.prefix / "var/backups/fleetp2p").exists()
        assert not host.agent_toml.exists() and not venv.exists()
        assert not failing.containerd_config.exists() and not (failing.certs / "_default").exists()
        assert restarts.read_text().count("restart") == 4   # config.toml restored on agent-1, removed on agent-2
        for machine in (host, failing, tracker):
            assert not _listening(machine.port), f"something still listens on {machine.port} after rollback"
    finally:
        _kill_started_under(f"{tmp_path}/")


_V2_TABLE = ("plugins", "io.containerd.grpc.v1.cri", "registry")
_V3_TABLE = ("plugins", "io.containerd.cri.v1.images", "registry")


def _table(document: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        document = document[key]
    return document


def test_containerd_config_path_is_set_safely(tmp_path: Path) -> None:
    """Every shape of containerd config.toml the role may meet, one simulated host each."""
    default_dump = run(["containerd", "config", "default"]).stdout
    assert 'config_path = ""' in default_dump
    variants: dict[str, str | None] = {
        "missing": None,
        "debian": DEBIAN_CONTAINERD_CONFIG,
        "default-dump": default_dump,
        "header-only": 'version = 2\n\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
                       '  [plugins."io.containerd.grpc.v1.cri".registry.auths]\n',
        "version-3": 'version = 3\n\n[plugins."io.containerd.cri.v1.runtime"]\n  enable_selinux = false\n',
        "already-set": None,   # written below, once its prefix is known
        "version-1": '[plugins.cri]\n  sandbox_image = "pause:3.9"\n',
        "old-mirrors": 'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
                       '  endpoint = ["https://mirror.example"]\n',
        "other-path": 'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/srv/certs.d"\n',
    }
    hosts = {}
    for name, text in variants.items():
        prefix = tmp_path / name
        config = prefix / "etc/containerd/config.toml"
        config.parent.mkdir(parents=True)
        if name == "already-set":
            text = f'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n' \
                   f'  config_path = "{prefix}/etc/containerd/certs.d"\n'
            variants[name] = text
        if text is not None:
            config.write_text(text)
        hosts[name] = {"fleetp2p_prefix": str(prefix)}
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"all": {"hosts": hosts, "vars": {
        "ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}",
        "fleetp2p_agent_service_mode": "command",
        # config.toml only: no hosts.toml files.
        "fleetp2p_agent_registries": [], "fleetp2p_agent_containerd_default_mirror": False}}}))
    playbook = tmp_path / "containerd.yml"
    playbook.write_text(yaml.safe_dump([{"name": "containerd config only", "hosts": "all", "gather_facts": False,
                                         "tasks": [{"ansible.builtin.include_role": {
                                             "name": "fleetp2p_agent", "tasks_from": "containerd.yml"}}]}]))
    result = _playbook(str(playbook), inventory, check=False)
    recap = _recap(result.stdout)

    for name in ("version-1", "old-mirrors", "other-path"):
        assert recap[name]["failed"] == 1, (name, result.stdout[-6000:])
        assert (tmp_path / name / "etc/containerd/config.toml").read_text() == variants[name], name
    for phrase in ("containerd config migrate", "registry.mirrors tables", 'config_path = "/srv/certs.d"'):
        assert phrase in result.stdout, phrase
    for name in ("missing", "debian", "default-dump", "header-only", "version-3", "already-set"):
        assert recap[name]["failed"] == 0, (name, result.stdout[-6000:])
        text = (tmp_path / name / "etc/containerd/config.toml").read_text()
        table = _V3_TABLE if name == "version-3" else _V2_TABLE
        certs = f"{tmp_path / name}/etc/containerd/certs.d"
        assert _table(tomllib.loads(text), table)["config_path"] == certs, (name, text)
        assigned = [line for line in text.splitlines() if line.strip().startswith("config_path")]
        assert len(assigned) == 1, (name, text)
        if variants[name] is not None:
            kept = [line for line in variants[name].splitlines() if "config_path" not in line]
            assert all(line in text.splitlines() for line in kept), f"{name}: the operator's settings were lost"
        run(["containerd", "--config", str(tmp_path / name / "etc/containerd/config.toml"), "config", "dump"])
    assert (tmp_path / "already-set/etc/containerd/config.toml").read_text() == variants["already-set"]


# --- Prometheus and Grafana ------------------------------------------------------------------

def test_alert_rules_load_and_pass_their_unit_tests() -> None:
    promtool = _tool("promtool", "the prometheus package")
    run([promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")])
    run([promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")])
    result = run([promtool, "test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml")])
    assert "SUCCESS" in result.stdout + result.stderr


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fleetp2p_dashboards", GRAFANA_DIR / "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(GRAFANA_DIR.glob("*.json"))}


def _panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, rows' nested panels included."""
    out = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                out.append((inner["title"], target["expr"]))
    return out


def test_dashboards_are_generated_and_use_bounded_labels() -> None:
    generator = _load_generator()
    assert generator.main(["--check"]) == 0, "deploy/grafana/*.json are stale: run deploy/grafana/dashboards.py"
    dashboards = _dashboards()
    assert set(dashboards) == {"fleetp2p-fleet.json", "fleetp2p-tracker.json", "fleetp2p-node.json"}
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids)
    for name, dashboard in dashboards.items():
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(set(ids)) == len(ids), name
        for panel in dashboard["panels"]:
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, (name, panel["title"])
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
                assert panel["targets"], (name, panel["title"])
        for title, expr in _panel_queries(dashboard):
            grouped = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr)
                       for label in group.split(",")}
            matched = set(re.findall(r"[{,]\s*([a-zA-Z_]+)\s*[!=]~?", expr))
            assert grouped | matched <= BOUNDED_LABELS, (name, title, expr)
    assert any(v["name"] == "instance" for v in dashboards["fleetp2p-node.json"]["templating"]["list"])


def _exported_series_names() -> set[str]:
    """What an agent and a tracker export, as queried: counters `_total`, histograms `_bucket`."""
    from fleetp2p.metrics import Metrics
    from tracker.metrics import TrackerMetrics

    suffix = {"counter": "_total", "histogram": "_bucket"}
    return {family.name + suffix.get(family.type, "")
            for registry in (Metrics().registry, TrackerMetrics().registry) for family in registry.collect()}


def test_dashboards_cover_every_exported_metric() -> None:
    queried = " ".join(expr for dashboard in _dashboards().values() for _, expr in _panel_queries(dashboard))
    missing = sorted(name for name in _exported_series_names() if not re.search(rf"\b{name}\b", queried))
    assert not missing, f"metrics no dashboard shows (add panels in deploy/grafana/dashboards.py): {missing}"


class Prometheus:
    """A real Prometheus on a free loopback port, queried over its HTTP API."""

    def __init__(self, process: ManagedProcess, port: int) -> None:
        self.process = process
        self.url = f"http://{LOOPBACK}:{port}"

    def api(self, path: str, **params: str | list[str]) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        request = urllib.request.Request(f"{self.url}/api/v1/{path}?{query}")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
            raise AssertionError(f"Prometheus rejected {path} {params}: {body.get('error', e)}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return data["result"]


def _prometheus_config(targets: dict[str, list[str]]) -> dict:
    """The example scrape config with our targets, scraping every second."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(targets) <= set(jobs), f"unknown jobs {set(targets) - set(jobs)}"
    for name, job in jobs.items():
        job["static_configs"] = [{"targets": targets.get(name, [])}]
    return config


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, list[str]]], Prometheus]]:
    started: list[ManagedProcess] = []

    def start(targets: dict[str, list[str]]) -> Prometheus:
        workdir = tmp_path / "prometheus"
        workdir.mkdir()
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(_prometheus_config(targets)))
        port = free_port()
        process = ManagedProcess([_tool("prometheus", "the prometheus package"), f"--config.file={config}",
                                  f"--storage.tsdb.path={workdir / 'data'}",
                                  f"--web.listen-address={LOOPBACK}:{port}"],
                                 stdout=workdir / "stdout.log", stderr=workdir / "stderr.log")
        started.append(process.start())
        wait_http(f"http://{LOOPBACK}:{port}/-/ready", timeout=15, alive=process.alive)
        return Prometheus(process, port)

    try:
        yield start
    finally:
        for process in started:
            process.stop()


@pytest.fixture
def tracker_process(tmp_path: Path) -> Iterator[str]:
    """A standalone tracker (in-memory backend); yields HOST:PORT."""
    port = free_port()
    process = ManagedProcess([sys.executable, "-m", "fleetp2p", "tracker", "--listen", f"{LOOPBACK}:{port}"],
                             stdout=tmp_path / "tracker.out", stderr=tmp_path / "tracker.log", cwd=REPO)
    process.start()
    try:
        wait_http(f"http://{LOOPBACK}:{port}/healthz", timeout=15, alive=process.alive)
        yield f"{LOOPBACK}:{port}"
    finally:
        process.stop()


_ACCEPT = ("application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
           "application/vnd.docker.distribution.manifest.v2+json")


def _get_together(url: str, clients: int) -> list[int]:
    """GET `url` from `clients` threads released at the same moment; their statuses."""
    barrier = threading.Barrier(clients)

    def get(_: int) -> int:
        barrier.wait()
        return _http_status(url)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(get, range(clients)))


def _coalesce(agent: Agent, registry: Registry, pushed_image: Pushed, blobs: list[str]) -> None:
    """Request cold blobs from several threads at once until one request joins a fetch in flight."""
    for digest in blobs:
        url = f"{agent.url}/v2/{pushed_image.repo}/blobs/{digest}?ns={registry.host}"
        assert _get_together(url, 6) == [200] * 6
        if agent.metric("fleetp2p_coalesced_waiters_total", kind="blob") > 0:
            return
    pytest.fail("no request joined a fetch in flight: cannot exercise the coalesced-waiters panels")


def _variable_values(prom: Prometheus, dashboard: dict) -> list[dict[str, str]]:
    """Every combination of the dashboard's query variables, each list taken from Prometheus
    the way Grafana fills it (variables may use earlier ones)."""
    combos: list[dict[str, str]] = [{}]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"])
        assert m, f"unsupported variable query {variable['query']!r}"
        extended = []
        for combo in combos:
            found = prom.api(f"label/{m.group(2)}/values", **{"match[]": _substitute(m.group(1), combo)})
            assert found, f"variable {variable['name']}: no values for {variable['query']} with {combo}"
            extended += [{**combo, variable["name"]: value} for value in sorted(found)]
        combos = extended
    return combos


def _substitute(expr: str, values: dict[str, str]) -> str:
    expr = expr.replace("$__rate_interval", "1m").replace("$__range", "10m")
    for name, value in values.items():
        expr = expr.replace(f"${name}", value)
    assert "$" not in expr, f"unresolved variable in {expr}"
    return expr


def _finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def _swarm(tracker: str, **extra: Any) -> dict[str, Any]:
    """Agent settings for a node of the test fleet (ports are picked by the harness)."""
    return {"tracker": f"http://{tracker}", **extra}


def test_every_dashboard_query_returns_data(
        agent_factory: Callable[..., Agent], registry_anon: Registry, app_image: Layout,
        wide_image: Layout, pushed: Callable[[Registry, Layout, str], Pushed], containerd: Containerd,
        hosts_dir_for: Callable[..., Path], tracker_process: str,
        prometheus_factory: Callable[[dict[str, list[str]]], Prometheus]) -> None:
    first = agent_factory(registry_anon, **_swarm(tracker_process))
    second = agent_factory(registry_anon, **_swarm(tracker_process))
    # A node whose tracker is down: its failed tracker calls feed the failure panels.
    cut_off = agent_factory(registry_anon, tracker=f"http://{LOOPBACK}:{free_port()}")
    prom = prometheus_factory({
        "fleetp2p-agent": [first.host, second.host, cut_off.host],
        "fleetp2p-tracker": [tracker_process],
    })
    app = pushed(registry_anon, app_image, "dash/app")
    wide = pushed(registry_anon, wide_image, "dash/wide")

    # Traffic only after the first scrape, so every counter moves between two samples.
    deadline = time.monotonic() + 20
    while len([s for s in prom.query("up") if s["value"][1] == "1"]) < 4:
        assert time.monotonic() < deadline, f"targets not up: {prom.api('targets')['activeTargets']}"
        time.sleep(0.25)
    containerd.pull(app.ref, hosts_dir=hosts_dir_for(first, registry_anon))     # from upstream
    containerd.forget(app.ref)
    containerd.pull(app.ref, hosts_dir=hosts_dir_for(second, registry_anon))    # from the first node
    assert second.served_bytes("peer") > 0, "the second node did not get the image from its peer"
    config_digest = app_image.image.config.digest
    assert _http_status(f"{second.url}/v2/dash/app/blobs/{config_digest}?ns={registry_anon.host}") == 200
    _coalesce(first, registry_anon, wide, [layer.digest for layer in wide_image.image.layers])
    assert _http_status(f"{cut_off.url}/v2/dash/missing/manifests/v1?ns={registry_anon.host}",
                        {"Accept": _ACCEPT}) == 404
    assert _http_status(f"{cut_off.url}/v2/dash/app/blobs/{app_image.image.layers[-1].digest}"
                        f"?ns={registry_anon.host}") == 200
    assert _http_status(f"http://{tracker_process}/v1/blobs/sha256:{'0' * 64}") == 404

    # Each target of each panel must return a finite value for at least one choice of the
    # dashboard's variables (e.g. the tracker-failure panel has data for the cut-off node only).
    checks: dict[tuple[str, str, str], list[str]] = {}
    for name, dashboard in _dashboards().items():
        combos = _variable_values(prom, dashboard)
        for title, expr in _panel_queries(dashboard):
            checks[(name, title, expr)] = [_substitute(expr, combo) for combo in combos]
    assert len(checks) >= 60
    deadline = time.monotonic() + 20
    while checks:
        for key, candidates in list(checks.items()):
            if any(_finite(prom.query(candidate)) for candidate in candidates):
                del checks[key]
        if not checks or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not checks, "panels without data (is the metric exported? does the running code produce it?):\n" + \
        "\n".join(f"  {name} / {title}: {expr}" for name, title, expr in checks)

    rules = prom.api("rules")["groups"]
    assert {r["name"] for g in rules for r in g["rules"]} >= {"FleetP2PAgentDown", "FleetP2PTrackerDown"}
