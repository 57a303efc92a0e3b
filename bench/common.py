"""Shared machinery of the benchmarks: a workspace that owns temp dirs and
processes, free ports, test data, and the servers under test
(docker-registry, the agent, nginx, a rate-limited relay). Measuring
(curl, page cache, RSS, machine load) lives in measure.py.

Benchmarks print ratios measured against a reference started in the same run,
so the machine's absolute speed cancels out. Everything binds 127.0.0.1 on
free ports and is torn down on return, exception, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Callable, Sequence

from prometheus_client.parser import text_string_to_metric_families

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]
CHUNK = 4 * 1024 * 1024
GB = 1e9
MB = 1e6


class BenchError(RuntimeError):
    """The benchmark could not measure (a server failed, a check did not hold)."""


# Sizes and formatting ------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2,
          "mb": 1000**2, "g": 1024**3, "gib": 1024**3, "gb": 1000**3}


def parse_size(text: str) -> int:
    """`1GiB`, `512M` (binary, like dd), `1GB` (decimal) or plain bytes; for argparse."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"invalid size {text!r} (examples: 1GiB, 512MiB, 4G)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError("size must be > 0")
    return size


def parse_rate(text: str) -> float:
    """`1gbit`, `250mbit` (bits per second) or a size per second (`100MB`): bytes per second."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmg]?)bit\s*", text.lower())
    if match:
        return float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2)] / 8
    return float(parse_size(text))


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain fixed-width table: readable in a terminal and in a CI log."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def verdict(ok: bool) -> str:
    return "target met" if ok else "target missed"


# Ports and readiness -------------------------------------------------------

def free_port() -> int:
    """A port the kernel just handed out (tiny race with other binders; fine here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: "Proc", timeout: float = 20.0) -> None:
    """Poll until `url` answers 200; fail at once if the process behind it died."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with {proc.returncode()} before {url} answered:\n"
                             f"{proc.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = resp.status
        except (OSError, ValueError) as e:
            last = e
        time.sleep(0.05)
    raise BenchError(f"{url} not ready after {timeout}s (last: {last!r})\n{proc.log_tail()}")


# Processes and the workspace -----------------------------------------------

class Proc:
    """A server started in its own session, so stopping it reaches its children
    (nginx workers) by process group, never by name."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> "Proc":
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL it if it lingers; always reaps."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)  # stragglers in the group (workers)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def _signal(self, sig: int) -> None:
        assert self.popen is not None
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def cpu_seconds(self) -> float:
        """User+system CPU of every live process in its group (nginx workers, all threads)."""
        return group_cpu_seconds(self.pid)

    def log_tail(self, limit: int = 3000) -> str:
        try:
            data = self.log_path.read_bytes()[-limit:]
        except OSError:
            return ""
        return f"--- {self.name} log (tail) ---\n{data.decode(errors='replace')}"


def group_cpu_seconds(pgid: int) -> float:
    """CPU time used so far by the processes of one process group, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        # after "pid (comm)": state ppid pgrp session ... utime(11) stime(12)
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """A killed benchmark unwinds like Ctrl-C, so its cleanup runs."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def print_machine(when_busy: str) -> None:
    """Cores and load first: other work on the machine skews every ratio."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    print(f"machine: {cores} cores, load average {load:.2f}"
          + (f"  <-- other work is running: {when_busy}" if load > 0.5 * cores else ""))


class Workspace:
    """One temp dir and the processes started in it; `close()` kills and removes all.

    SIGTERM is turned into KeyboardInterrupt so a killed benchmark still runs
    its cleanup; SIGINT is ignored during cleanup so a second Ctrl-C cannot
    leave servers behind."""

    def __init__(self, base: str | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fleetp2p-bench-", dir=base))
        self.logs = self.dir("logs")
        self.procs: list[Proc] = []
        self._old_term = signal.signal(signal.SIGTERM, _raise_interrupt)

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=False)
        return path

    def spawn(self, name: str, argv: Sequence[str]) -> Proc:
        proc = Proc(name, argv, self.logs)
        self.procs.append(proc)
        return proc.start()

    def dump_logs(self) -> None:
        for proc in self.procs:
            tail = proc.log_tail()
            if tail:
                print(tail, file=sys.stderr)

    def close(self) -> None:
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for proc in reversed(self.procs):
                proc.stop()
            self.procs.clear()
            shutil.rmtree(self.root, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, self._old_term)

    def require_free_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free < needed * 1.1:
            raise BenchError(f"{self.root} has {human_bytes(free)} free; this run needs about "
                             f"{human_bytes(needed)} (use a smaller --size or TMPDIR elsewhere)")


def run_bench(body: Callable[[Workspace], int]) -> int:
    """Run `body` in a fresh workspace; map failures to an exit code (1 error, 130 interrupt)."""
    try:
        with Workspace(os.environ.get("TMPDIR")) as ws:
            try:
                return body(ws)
            except Exception:
                ws.dump_logs()  # the servers' own words on what went wrong
                raise
    except KeyboardInterrupt:
        print("interrupted: servers stopped, temp files removed", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1


# Test data -----------------------------------------------------------------

def write_random_blob(path: Path, size: int) -> str:
    """Write `size` random bytes and return their sha256 digest.

    Streams in 4 MiB chunks (never the whole blob in memory). Two threads draw
    from os.urandom, which releases the GIL, with at most four chunks in
    flight: urandom alone is the bottleneck (~0.6 GB/s per thread here)."""
    hasher = hashlib.sha256()
    counts = [min(CHUNK, size - at) for at in range(0, size, CHUNK)]
    with open(path, "wb") as f, concurrent.futures.ThreadPoolExecutor(2) as pool:
        pending: collections.deque[concurrent.futures.Future[bytes]] = collections.deque()
        todo = iter(counts)
        for n in todo:
            pending.append(pool.submit(os.urandom, n))
            if len(pending) >= 4:
                break
        while pending:
            data = pending.popleft().result()
            n = next(todo, None)
            if n is not None:
                pending.append(pool.submit(os.urandom, n))
            f.write(data)
            hasher.update(data)
    return f"sha256:{hasher.hexdigest()}"


# Servers -------------------------------------------------------------------

class Registry:
    """`docker-registry serve` with filesystem storage in the workspace."""

    def __init__(self, ws: Workspace, name: str = "registry") -> None:
        self.ws = ws
        self.name = name
        self.port = free_port()
        self.storage = ws.dir(f"{name}-storage")
        self.proc: Proc | None = None

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def process(self) -> Proc:
        assert self.proc is not None, "start() first"
        return self.proc

    def start(self) -> "Registry":
        config = self.ws.root / f"{self.name}.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            f"http:\n  addr: {self.host}\n  secret: fleetp2p-bench-{self.port}\n")
        self.proc = self.ws.spawn(self.name, ["docker-registry", "serve", str(config)])
        wait_http(f"http://{self.host}/v2/", self.proc)
        return self

    def blob_url(self, repo: str, digest: str) -> str:
        return f"http://{self.host}/v2/{repo}/blobs/{digest}"

    def blob_path(self, digest: str) -> Path:
        hex_ = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    def push_blob(self, repo: str, path: Path, digest: str) -> None:
        """Monolithic upload: POST a session, PUT the file streamed as the body."""
        size = path.stat().st_size
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=600, blocksize=1024 * 1024)
        try:
            conn.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
            resp = conn.getresponse()
            resp.read()
            location = resp.getheader("Location")
            if resp.status != 202 or not location:
                raise BenchError(f"registry: starting an upload gave HTTP {resp.status}")
            url = urllib.parse.urlsplit(location)
            query = urllib.parse.parse_qsl(url.query) + [("digest", digest)]
            target = f"{url.path}?{urllib.parse.urlencode(query)}"
            with open(path, "rb") as body:
                conn.request("PUT", target, body=body, headers={
                    "Content-Length": str(size), "Content-Type": "application/octet-stream"})
                resp = conn.getresponse()
                detail = resp.read()[:300]
            if resp.status != 201:
                raise BenchError(f"registry: finishing the upload gave HTTP {resp.status}: "
                                 f"{detail!r}")
        finally:
            conn.close()
        if not self.blob_path(digest).exists():
            raise BenchError(f"registry: pushed blob not found at {self.blob_path(digest)}")


def agent_defaults() -> dict[str, object]:
    """Config keys of the agent in this tree with their defaults: the benchmarks
    set only keys that exist, and print the defaults they rely on."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    from fleetp2p.config import Config

    return {f.name: getattr(Config(), f.name) for f in dataclasses.fields(Config)}


def code_version() -> str:
    """The commit measured, and whether fleetp2p/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--",
                                "fleetp2p", "tracker"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" + uncommitted changes" if dirty else "")


def add_agent_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracker", default=None, metavar="MODE",
                        help="the agent's tracker key: embedded or none (default: the agent's "
                        "default); embedded trackers and peer listeners get free ports")


class Agent:
    """`fleetp2p agent` pointing at one registry, with its own data dir.

    Every port it would listen on (mirror, embedded tracker, BitTorrent peers)
    is a free one, so several agents, and agents of other users on this
    machine, never collide."""

    def __init__(self, ws: Workspace, registry: Registry, name: str,
                 event_loop: str = "asyncio", tracker: str | None = None,
                 upstream: str | None = None) -> None:
        self.ws = ws
        self.registry = registry
        self.upstream = upstream or registry.host  # HOST:PORT it connects to (maybe a Throttle)
        self.name = name
        self.event_loop = event_loop
        self.tracker = tracker
        self.port = free_port()
        self.data_dir = ws.dir(f"{name}-data")
        self.proc: Proc | None = None

    @staticmethod
    def describe(tracker: str | None) -> str:
        defaults = agent_defaults()
        if "tracker" not in defaults:
            return "no tracker/swarm in this agent"
        return f"tracker={tracker or defaults['tracker']}" + ("" if tracker else " (agent default)")

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def process(self) -> Proc:
        assert self.proc is not None, "start() first"
        return self.proc

    def start(self) -> "Agent":
        argv = [sys.executable, "-m", "fleetp2p", "agent", "--listen", f"{LOOPBACK}:{self.port}",
                "--data-dir", str(self.data_dir), "--event-loop", self.event_loop,
                "--registry", f"{self.registry.host}=http://{self.upstream}"]
        keys = agent_defaults()
        # every other listener (embedded tracker, BitTorrent peers, peer HTTP, ...) on a
        # free port too: defaults are fixed ports or derived ones (peer port + 1)
        for key in sorted(keys):
            if key.endswith("_listen") and isinstance(keys[key], str):
                argv += ["--" + key.replace("_", "-"), f"{LOOPBACK}:{free_port()}"]
        if self.tracker is not None:
            if "tracker" not in keys:
                raise BenchError("--tracker given, but this agent has no tracker key")
            argv += ["--tracker", self.tracker]
        self.proc = self.ws.spawn(self.name, argv)
        wait_http(f"http://{LOOPBACK}:{self.port}/_fleetp2p/health", self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def remove(self) -> None:
        """Stop and delete the data dir: the next agent starts cold and the disk stays small."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def blob_url(self, repo: str, digest: str) -> str:
        return (f"http://{LOOPBACK}:{self.port}/v2/{repo}/blobs/{digest}"
                f"?ns={urllib.parse.quote(self.registry.host)}")

    def blob_path(self, digest: str) -> Path:
        """Where the store keeps the blob: one file, or a directory of segment files."""
        algorithm, hex_ = digest.split(":", 1)
        return self.data_dir / "blobs" / algorithm / hex_

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` carrying `labels` (0 when absent)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and wanted <= ls)


class Nginx:
    """Debian's nginx serving files under `root` with sendfile, everything in the workspace."""

    def __init__(self, ws: Workspace, root: Path, name: str = "nginx") -> None:
        self.ws = ws
        self.root = root
        self.name = name
        self.port = free_port()
        self.prefix = ws.dir(name)
        self.proc: Proc | None = None

    @property
    def process(self) -> Proc:
        assert self.proc is not None, "start() first"
        return self.proc

    def start(self) -> "Nginx":
        p = self.prefix
        conf = p / "nginx.conf"
        # `user root`: workers must read the agent's store inside a 0700 temp dir.
        conf.write_text(f"""
user root;
daemon off;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {p}/access.log;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    server {{
        listen {LOOPBACK}:{self.port};
        root {self.root};
        location / {{ }}
    }}
}}
""")
        self.proc = self.ws.spawn(self.name, ["nginx", "-c", str(conf), "-p", str(p)])
        # nginx answers 404/403 for "/", so poll until the port accepts instead.
        deadline = time.monotonic() + 10
        while True:
            if not self.proc.alive():
                raise BenchError(f"nginx exited: {(p / 'error.log').read_text(errors='replace')}")
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError("nginx did not start listening within 10 s") from None
                time.sleep(0.05)

    def url(self, relative: str) -> str:
        return f"http://{LOOPBACK}:{self.port}/{relative}"


class Throttle:
    """bench/throttle.py in front of the registry: a slower link for this run only."""

    def __init__(self, ws: Workspace, registry: Registry, rate: float) -> None:
        self.ws = ws
        self.registry = registry
        self.rate = rate
        self.port = free_port()
        self.proc: Proc | None = None

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> "Throttle":
        script = Path(__file__).with_name("throttle.py")
        self.proc = self.ws.spawn("throttle", [
            sys.executable, str(script), "--listen", str(self.port),
            "--target", self.registry.host, "--rate", str(self.rate)])
        wait_http(f"http://{self.host}/v2/", self.proc)
        return self

    def blob_url(self, repo: str, digest: str) -> str:
        return f"http://{self.host}/v2/{repo}/blobs/{digest}"
