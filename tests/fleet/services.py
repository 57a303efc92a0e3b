"""The fleet's infrastructure, each on its own host: the upstream registry
(distribution 2.8), standalone trackers, and Redis for replicated trackers.

Every server binds its host's namespace address (or loopback inside the
namespace), never anything in the root namespace. Readiness is polled from a
thread inside the host's namespace (`Host.call`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from harness.images import Layout, Pushed, http_push
from harness.process import ManagedProcess
from harness.regclient import RegistryClient
from harness.registry import AccessLog

from .netns import Host, stop_process

REGISTRY_PORT = 5000
TRACKER_PORT = 7000
REDIS_PORT = 6379
MiB = 1 << 20


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               alive: Callable[[], bool] | None = None, interval: float = 0.05) -> None:
    """Poll `check` (exceptions count as "not yet") until true; fail fast if `alive` says no."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: process exited (last: {last!r})")
        try:
            if check():
                return
        except Exception as e:  # noqa: BLE001 - anything means "not ready yet"
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout}s (last: {last!r})")


@dataclass(frozen=True)
class BlobFile:
    """A random blob on local disk, as pushed to the upstream."""

    path: Path
    digest: str
    size: int
    repo: str

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


def write_random_blob(path: Path, size: int) -> str:
    """Incompressible bytes (every blob unique, so no dedup hides a byte); returns its digest."""
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MiB))
            sha.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return f"sha256:{sha.hexdigest()}"


class UpstreamRegistry:
    """`docker-registry serve` on the registry host at <addr>:5000, anonymous, filesystem
    storage. Its access log counts exactly which blob bytes left the upstream (and,
    through the remote address, to which host)."""

    def __init__(self, host: Host, workdir: Path) -> None:
        self.host = host
        self.workdir = workdir
        self.process: ManagedProcess | None = None
        self.access_log = AccessLog(workdir / "access.log")

    @property
    def name(self) -> str:
        """The registry as clients name it (image references, `[[registries]] name`)."""
        return f"{self.host.addr}:{REGISTRY_PORT}"

    @property
    def url(self) -> str:
        return f"http://{self.name}"

    def start(self) -> "UpstreamRegistry":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        config.write_text(f"""version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: "{self.workdir / 'storage'}"
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: "{self.name}"
  secret: fleetp2p-fleet-test
""")
        # Access log lines go to stdout, the application log to stderr.
        self.process = ManagedProcess(self.host.argv("docker-registry", "serve", str(config)),
                                      stdout=self.access_log.path,
                                      stderr=self.workdir / "registry.log")
        self.host.network.track(self.process)
        self.process.start()
        wait_until(lambda: self.host.http_get(f"{self.url}/v2/", timeout=2)[0] == 200, 15,
                   "docker-registry", self.process.alive)
        return self

    def client(self) -> RegistryClient:
        """Use only inside the registry host (`host.call`): the URL is its namespace address."""
        return RegistryClient(self.url)

    def push_blob(self, path: Path, repo: str) -> BlobFile:
        digest = "sha256:" + _file_sha256(path)
        self.host.call(lambda: self.client().push_blob(repo, digest, path), timeout=600)
        return BlobFile(path, digest, path.stat().st_size, repo)

    def push_layout(self, layout: Layout, repo: str) -> Pushed:
        """An image or artifact, blobs then manifests, over the distribution API."""
        return self.host.call(lambda: http_push(layout, self.client(), self.name, repo), timeout=600)

    def blob_bytes(self, since: int, digests: set[str] | None = None) -> int:
        """Blob bytes sent since `since` (an `access_log.mark()`), optionally only for
        some digests. Waits for the log to settle: a line lands just after its body."""
        self.access_log.settle()
        return self.access_log.blob_bytes(since, digests=digests)


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            sha.update(chunk)
    return sha.hexdigest()


def fleetp2p_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleetp2p", *args]


class Tracker:
    """`fleetp2p tracker` on the tracker host; `--lease-ttl` short so tests see expiry."""

    def __init__(self, host: Host, workdir: Path, port: int = TRACKER_PORT, *,
                 redis: str | None = None, lease_ttl: float = 2.0, token: str | None = None,
                 lease_limit: int | None = None, log_level: str = "debug") -> None:
        self.host = host
        self.workdir = workdir
        self.port = port
        self.redis = redis
        self.lease_ttl = lease_ttl
        self.token = token
        self.lease_limit = lease_limit
        self.log_level = log_level
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host.addr}:{self.port}"

    def start(self) -> "Tracker":
        argv = fleetp2p_command("tracker", "--listen", f"{self.host.addr}:{self.port}",
                                "--lease-ttl", str(self.lease_ttl), "--log-level", self.log_level)
        if self.redis:
            argv += ["--redis", self.redis]
        if self.token:
            argv += ["--token", self.token]
        if self.lease_limit is not None:
            argv += ["--lease-limit", str(self.lease_limit)]
        self.process = self.host.start(argv, name=f"tracker-{self.port}", cwd=self.workdir)
        wait_until(lambda: self.host.http_get(f"{self.url}/healthz", timeout=2)[0] == 200, 20,
                   f"tracker {self.url}", self.process.alive)
        return self

    def kill9(self) -> None:
        if self.process is not None:
            self.process.kill9()

    def stop(self) -> None:
        stop_process(self.process)

    def log(self) -> str:
        return self.process.stderr_text() if self.process is not None else ""


class Redis:
    """redis-server on the tracker host's loopback, no persistence."""

    def __init__(self, host: Host, workdir: Path, port: int = REDIS_PORT) -> None:
        self.host = host
        self.workdir = workdir
        self.port = port
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "Redis":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = self.host.start(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir),
             "--save", "", "--appendonly", "no"], name=f"redis-{self.port}")
        wait_until(lambda: self.host.call(self._ping, timeout=5), 15, "redis", self.process.alive)
        return self

    def _ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.workdir, ignore_errors=True)
