"""`fleetp2p status`: what the agent holds, fetches and has seen go wrong."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from fleetp2p import __version__
from fleetp2p.cli.agentclient import AgentClient, add_agent_flag, run_command
from fleetp2p.cli.progress import human_bytes, short_digest

NA = "n/a"


def add_parser(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="show the agent's store, pins, fetches and errors",
                            description="Show the running agent's view: store usage and "
                                        "watermarks, pinned references, blobs in flight, bytes "
                                        "by source, upstream errors, swarm state.")
    add_agent_flag(status)
    status.add_argument("--json", action="store_true", help="print the agent's status JSON")
    status.set_defaults(func=lambda args: run_command(args, _status))


def _status(args: argparse.Namespace) -> int:
    data = AgentClient(args.agent).status()
    if args.json:
        print(json.dumps({**data, "cli_version": __version__}, indent=2))
        return 0
    console = Console(file=sys.stdout, highlight=False)
    console.print(render(data, args.agent))
    return 0


def render(data: dict[str, Any], url: str) -> Table:
    """A two-column table; long lists (pins, in flight) one row each."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")

    def row(name: str, value: str) -> None:
        table.add_row(name, value.replace("[", r"\["))

    row("agent", f"fleetp2p {data.get('version', '?')} at {url} (cli {__version__}); default "
                 f"registry {data.get('default_registry')}")
    store = data.get("store") or {}
    usage = store.get("usage")
    percent = f" ({usage * 100:.0f}%)" if usage is not None else ""
    row("store", f"{human_bytes(store.get('bytes', 0))} of {human_bytes(store.get('limit', 0))}"
                 f"{percent}")
    row("", f"{store.get('blobs', 0)} blobs; high watermark {human_bytes(store.get('high_bytes', 0))},"
            f" low {human_bytes(store.get('low_bytes', 0))}; pinned "
            f"{human_bytes(store.get('pinned_bytes', 0))}"
            + ("; ABOVE HIGH WATERMARK" if store.get("above_high_watermark") else ""))
    free = store.get("disk_free_bytes")
    row("data dir", f"{data.get('data_dir')} ({human_bytes(free) + ' free' if free is not None else NA})")
    pins = data.get("pins") or []
    if not pins:
        row("pinned", "none")
    for i, pin in enumerate(pins):
        missing = pin["digests"] - pin["present"]
        row("pinned" if i == 0 else "", f"{pin['label']}  {pin['present']} blobs, "
            f"{human_bytes(pin['bytes'])}" + (f" ({missing} missing)" if missing else ""))
    inflight = data.get("inflight") or []
    if not inflight:
        row("in flight", "none")
    for i, item in enumerate(inflight):
        size = item.get("size", -1)
        done = item.get("done", 0)
        pct = f" ({done * 100 / size:.0f}%)" if size and size > 0 else ""
        row("in flight" if i == 0 else "",
            f"{short_digest(item['digest'])}  {human_bytes(done)} of "
            f"{human_bytes(size) if size >= 0 else '?'}{pct} from {item.get('source') or '?'}")
    row("served", _sources(data.get("served_bytes")))
    fetched = data.get("fetched_bytes")
    if (data.get("swarm") or {}).get("enabled"):
        row("fetched", _sources(fetched) if fetched else NA)
    upstream = data.get("upstream") or {}
    received = upstream.get("bytes") or {}
    row("upstream", ", ".join(f"{r['name']} ({r['url']})" for r in upstream.get("registries", []))
        or "no [[registries]] configured")
    row("", f"received {human_bytes(received.get('blob', 0))} blobs, "
            f"{human_bytes(received.get('manifest', 0))} manifests")
    errors = upstream.get("errors") or {}
    row("", "errors: " + (", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none"))
    failures = data.get("verification_failures")
    row("verification", f"{failures} failures" if failures else "no failures")
    swarm = data.get("swarm") or {}
    reachable = swarm.get("tracker_reachable")
    reachable_text = NA if reachable is None else "reachable" if reachable else "UNREACHABLE"
    if not swarm.get("enabled"):
        row("swarm", f"off (tracker = \"none\"): tracker {NA}, peers {NA}, peer port {NA}")
    else:
        row("swarm", f"tracker {swarm.get('tracker_url') or NA} ({reachable_text}); peers "
                     f"{NA if swarm.get('peers') is None else swarm['peers']}; peer port "
                     f"{swarm.get('peer_listen') or NA}; node {swarm.get('node_id') or NA}")
    return table


def _sources(values: dict[str, int] | None) -> str:
    if not values:
        return NA
    return ", ".join(f"{k} {human_bytes(v)}" for k, v in values.items())
