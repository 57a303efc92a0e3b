"""The fleetp2p agent as a subprocess, configured by a TOML file the harness writes.

Readiness is `GET /v2/` → 200. Metrics are parsed with prometheus_client's own
parser so tests read exactly what Prometheus would scrape.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from prometheus_client.parser import text_string_to_metric_families

from .ports import LOOPBACK, free_port
from .process import ManagedProcess

REPO_ROOT = Path(__file__).resolve().parents[2]

MetricKey = tuple[str, frozenset[tuple[str, str]]]


@dataclass(frozen=True)
class UpstreamEntry:
    """One `[[registries]]` table."""

    name: str
    url: str
    username: str | None = None
    password: str | None = None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def render_config(settings: Mapping[str, Any], registries: list[UpstreamEntry]) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in settings.items() if v is not None]
    for r in registries:
        lines += ["", "[[registries]]", f"name = {_toml_value(r.name)}", f"url = {_toml_value(r.url)}"]
        if r.username is not None:
            lines.append(f"username = {_toml_value(r.username)}")
        if r.password is not None:
            lines.append(f"password = {_toml_value(r.password)}")
    return "\n".join(lines) + "\n"


def agent_command() -> list[str]:
    """`python -m fleetp2p` when the package has a __main__, else the console script."""
    if (REPO_ROOT / "fleetp2p" / "__main__.py").exists():
        return [sys.executable, "-m", "fleetp2p"]
    script = shutil.which("fleetp2p")
    if script is None:
        raise RuntimeError("neither fleetp2p/__main__.py nor a `fleetp2p` console script exists")
    return [script]


def parse_metrics(text: str) -> dict[MetricKey, float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric_sum(metrics: Mapping[MetricKey, float], name: str, **labels: str) -> float:
    """Sum of samples named `name` whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= ls)


@dataclass
class Agent:
    """A fleetp2p agent process; keeps port and data_dir across restarts."""

    workdir: Path
    registries: list[UpstreamEntry]
    default_registry: str | None = None
    port: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    ready_timeout: float = 10.0
    process: ManagedProcess | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The defaults (tracker on :5051, peers on :6881) would collide between
        # agents of one test and with anything else on the machine.
        if self.settings.get("tracker", "embedded") == "embedded":
            self.settings.setdefault("tracker_listen", f"{LOOPBACK}:{free_port()}")
        self.settings.setdefault("peer_listen", f"{LOOPBACK}:{free_port()}")
        self.settings.setdefault("peer_http_listen", f"{LOOPBACK}:{free_port()}")

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def config_path(self) -> Path:
        return self.workdir / "agent.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.stderr.log"

    def write_config(self) -> Path:
        settings: dict[str, Any] = {"listen": self.host, "data_dir": str(self.data_dir),
                                    "default_registry": self.default_registry,
                                    "upstream_stall_timeout": 5.0, "log_level": "debug"}
        settings.update(self.settings)
        self.config_path.write_text(render_config(settings, self.registries))
        return self.config_path

    def start(self) -> "Agent":
        self.write_config()
        self.process = ManagedProcess([*agent_command(), "agent", "--config", str(self.config_path)],
                                      stdout=self.workdir / "agent.stdout.log", stderr=self.log_path,
                                      cwd=self.workdir)
        self.process.start()
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout
        last: object = None
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"agent exited with {self.process.returncode()} before ready:\n"
                                   f"{self.process.stderr_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        return
                    last = resp.status
            except urllib.error.HTTPError as e:
                last = e.code
            except OSError as e:
                last = e
            time.sleep(0.05)
        raise TimeoutError(f"agent not ready on {self.url}/v2/ after {self.ready_timeout}s "
                           f"(last: {last!r}):\n{self.process.stderr_text()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM then wait (SIGKILL after `timeout`); returns the exit code."""
        return self.process.stop(timeout) if self.process is not None else None

    def kill9(self) -> int | None:
        return self.process.kill9() if self.process is not None else None

    def restart(self) -> "Agent":
        """Stop (gracefully if still running) and start again on the same port and data_dir."""
        self.stop()
        return self.start()

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def log(self, tail: int = 20000) -> str:
        """Tail of the agent's stderr and stdout (wherever its logging goes)."""
        if self.process is None:
            return ""
        out = self.process.stdout_text(tail=tail)
        return self.process.stderr_text(tail=tail) + (f"\n--- stdout ---\n{out}" if out else "")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def metrics(self) -> dict[MetricKey, float]:
        return parse_metrics(self.metrics_text())

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.metrics(), name, **labels)

    def served_bytes(self, source: str) -> float:
        return self.metric("fleetp2p_served_bytes_total", source=source)


@contextlib.contextmanager
def start_agent(registries: list[UpstreamEntry], default_registry: str | None = None, *,
                base_dir: Path | None = None, **settings: Any) -> Iterator[Agent]:
    """Run an agent until the block exits; its workdir (data_dir, logs) is then removed."""
    workdir = Path(tempfile.mkdtemp(prefix="agent-", dir=base_dir))
    agent = Agent(workdir, registries, default_registry, settings=settings)
    try:
        agent.start()
        yield agent
    finally:
        agent.stop()
        shutil.rmtree(workdir, ignore_errors=True)
