"""fleetp2p agents on fleet hosts: one per host, each with its OCI mirror on the
host's own loopback (127.0.0.1:5050) and its BitTorrent port on the host's
address, configured by a TOML file written with the harness's renderer."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fleetp2p.metrics import HEDGE_WINNERS
from harness.agent import MetricKey, UpstreamEntry, metric_sum, parse_metrics, render_config
from harness.process import ManagedProcess

from .netns import Host, stop_process
from .services import UpstreamRegistry, fleetp2p_command, wait_until

AGENT_PORT = 5050
PEER_PORT = 6881

# The agent's own defaults otherwise (peer_stall_timeout included: a test that
# wants a stall noticed sooner says so itself).
TEST_DEFAULTS: dict[str, Any] = {
    "log_level": "debug",
    "upstream_stall_timeout": 5.0,
}


@dataclass
class FleetAgent:
    """One node's agent process; keeps its data_dir across restarts."""

    host: Host
    workdir: Path
    registries: list[UpstreamEntry]
    default_registry: str
    settings: dict[str, Any] = field(default_factory=dict)
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """Only meaningful inside the host (clients run there; see `Host.call`)."""
        return f"http://127.0.0.1:{AGENT_PORT}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def config_path(self) -> Path:
        return self.workdir / "agent.toml"

    def blob_dir(self, digest: str) -> Path:
        """Where the store keeps a blob's segment files `0`, `1`, …"""
        algorithm, _, hex_digest = digest.partition(":")
        return self.data_dir / "blobs" / algorithm / hex_digest

    def write_config(self) -> Path:
        settings: dict[str, Any] = {
            "listen": f"127.0.0.1:{AGENT_PORT}", "data_dir": str(self.data_dir),
            "default_registry": self.default_registry,
            "peer_listen": f"{self.host.addr}:{PEER_PORT}", "advertise_addr": self.host.addr,
            **TEST_DEFAULTS, **self.settings}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self.config_path.write_text(render_config(settings, self.registries))
        return self.config_path

    def launch(self) -> "FleetAgent":
        """Start without waiting (so a fleet starts in parallel); then `wait_ready`."""
        self.write_config()
        self.process = self.host.start(fleetp2p_command("agent", "--config", str(self.config_path)),
                                       name="agent", cwd=self.workdir)
        return self

    def wait_ready(self, timeout: float = 30) -> "FleetAgent":
        assert self.process is not None
        wait_until(lambda: self.host.http_get(f"{self.url}/v2/", timeout=2)[0] == 200, timeout,
                   f"agent on {self.host.name}", self.process.alive)
        return self

    def start(self) -> "FleetAgent":
        return self.launch().wait_ready()

    def stop(self) -> None:
        stop_process(self.process)

    def kill9(self) -> None:
        """SIGKILL: a crashed node (no lease release, no leave announce)."""
        if self.process is not None:
            self.process.kill9()

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def log(self, tail: int = 30000) -> str:
        if self.process is None:
            return ""
        return self.process.stderr_text(tail) + self.process.stdout_text(tail // 4)

    def metrics(self) -> dict[MetricKey, float]:
        status, body = self.host.http_get(f"{self.url}/metrics", timeout=5)
        if status != 200:
            raise RuntimeError(f"/metrics on {self.host.name}: {status}")
        return parse_metrics(body.decode())

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.metrics(), name, **labels)


@dataclass(frozen=True)
class Snapshot:
    """The counters a fleet test asserts on, read from one agent at one moment."""

    upstream_blob_bytes: float
    served: dict[str, float]
    segments: dict[str, float]
    hash_failures: float
    lease_waits: float
    hedges: dict[str, float]  # first-piece reads that asked other downloaders too, by winner
    peer_served: float  # bytes this node sent to other nodes over HTTP

    @classmethod
    def of(cls, agent: FleetAgent) -> "Snapshot":
        m = agent.metrics()
        sources = ("local", "upstream", "peer")
        return cls(metric_sum(m, "fleetp2p_upstream_bytes_total", kind="blob"),
                   {s: metric_sum(m, "fleetp2p_served_bytes_total", source=s) for s in sources},
                   {s: metric_sum(m, "fleetp2p_segments_fetched_total", source=s) for s in sources},
                   metric_sum(m, "fleetp2p_piece_hash_failures_total"),
                   metric_sum(m, "fleetp2p_lease_waits_total"),
                   {w: metric_sum(m, "fleetp2p_read_hedges_total", winner=w)
                    for w in HEDGE_WINNERS},
                   metric_sum(m, "fleetp2p_peer_served_bytes_total"))


def start_agents(hosts: Sequence[Host], base: Path, upstream: UpstreamRegistry,
                 **settings: Any) -> list[FleetAgent]:
    """One agent per host, started in parallel (each takes ~1 s of CPU to import)."""
    entry = UpstreamEntry(upstream.name, upstream.url)
    agents = [FleetAgent(h, base / f"agent-{h.name}", [entry], upstream.name, dict(settings))
              for h in hosts]
    for a in agents:
        a.launch()
    for a in agents:
        a.wait_ready(timeout=30 + 2 * len(agents))
    return agents


def remove_agent_dirs(agents: Sequence[FleetAgent]) -> None:
    for a in agents:
        shutil.rmtree(a.workdir, ignore_errors=True)
