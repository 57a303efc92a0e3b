"""`fleetp2p doctor`: is this machine ready to pull through fleetp2p?

Runs every check in fleetp2p/cli/checks.py (and registriesconf.py) in the
order an operator would fix things (config → disk → agent → swarm →
containerd → registries.conf → upstreams → store), prints one line per check
with the fix for each failure, and exits 0 only if nothing failed (skipped
checks are not failures).
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from fleetp2p.cli import checks
from fleetp2p.cli.agentclient import DEFAULT_AGENT_URL, run_command
from fleetp2p.cli.checks import FAIL, PASS, SKIP, Check
from fleetp2p.cli.registriesconf import DEFAULT_REGISTRIES_CONF, check_registries_conf

_MARKS = {PASS: "[green]PASS[/green]", FAIL: "[bold red]FAIL[/bold red]", SKIP: "[dim]SKIP[/dim]"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    doctor = sub.add_parser(
        "doctor", help="check config, disk, agent, tracker, containerd and upstreams",
        description="Self-test of this machine's fleetp2p setup. Exit code 0 only if every check "
                    "passes.")
    doctor.add_argument("--config", "-c", metavar="FILE",
                        help=f"agent config (default {checks.DEFAULT_CONFIG} if it exists)")
    doctor.add_argument("--agent", metavar="URL",
                        help=f"agent URL (default: from the config's listen, else {DEFAULT_AGENT_URL})")
    doctor.add_argument("--containerd-config", metavar="FILE",
                        help=f"containerd config (default {checks.DEFAULT_CONTAINERD_CONFIG})")
    doctor.add_argument("--hosts-dir", metavar="DIR",
                        help="containerd hosts dir (default: its config_path, else "
                             f"{checks.DEFAULT_HOSTS_DIR})")
    doctor.add_argument("--registries-conf", metavar="FILE",
                        help="containers registries.conf of podman, skopeo and CRI-O, with its .d "
                             f"drop-ins (default {DEFAULT_REGISTRIES_CONF}; checked only if it "
                             "names the agent)")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    doctor.set_defaults(func=lambda args: run_command(args, _doctor))


def run_checks(args: argparse.Namespace) -> list[Check]:
    results: list[Check] = []
    config_check, cfg = checks.check_config(args.config)
    results.append(config_check)
    agent_url = args.agent or _agent_url_from(cfg)
    if cfg is not None:
        results.append(checks.check_data_dir(cfg.data_dir))
    agent_check, status = checks.check_agent(agent_url)
    results.append(agent_check)
    tracker_url = getattr(cfg, "tracker_url", None)
    results.append(checks.check_tracker(tracker_url, getattr(cfg, "tracker_token", None) or None))
    results.append(checks.check_peer_port(getattr(cfg, "peer_listen", None) if tracker_url else None))
    containerd_check, config_path = checks.check_containerd_config(args.containerd_config)
    results.append(containerd_check)
    hosts_dir = args.hosts_dir or config_path or checks.DEFAULT_HOSTS_DIR
    if containerd_check.status != SKIP or args.hosts_dir:
        for name in _registry_names(cfg):
            results.append(checks.check_hosts_toml(hosts_dir, name, agent_url))
    results += check_registries_conf(args.registries_conf, agent_url,
                                     getattr(cfg, "default_registry", "docker.io"),
                                     getattr(cfg, "registry_in_path", True))
    if cfg is not None:
        for registry in (cfg.registries or [cfg.registry(cfg.default_registry)]):
            results.append(checks.check_upstream(registry))
    results.append(checks.check_store(status, cfg))
    return results


def _agent_url_from(cfg: object) -> str:
    """Where the agent listens, as a client on this machine reaches it."""
    if cfg is None:
        return DEFAULT_AGENT_URL
    host, port = cfg.listen_host, cfg.listen_port  # type: ignore[attr-defined]
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _registry_names(cfg: object) -> list[str]:
    if cfg is None:
        return []
    names = [r.name for r in cfg.registries]  # type: ignore[attr-defined]
    default = cfg.default_registry  # type: ignore[attr-defined]
    return names if default in names else [*names, default]


def _doctor(args: argparse.Namespace) -> int:
    results = run_checks(args)
    failed = [c for c in results if c.status == FAIL]
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [c.to_json() for c in results]}, indent=2))
        return 1 if failed else 0
    console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    width = max(len(c.name) for c in results)
    for c in results:
        line = f"{c.name:<{width}}  {c.detail}"
        if c.fix:
            line += f" — fix: {c.fix}"
        console.print(f"{_MARKS[c.status]}  ", end="")
        console.print(line, markup=False)
    passed = sum(c.status == PASS for c in results)
    skipped = sum(c.status == SKIP for c in results)
    console.print(f"{passed} passed, {len(failed)} failed, {skipped} skipped", markup=False)
    return 1 if failed else 0
