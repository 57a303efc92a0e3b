"""containerd 1.6 started by hand with a throwaway root, driven with `ctr`.

The socket lives under a short /tmp path (unix socket paths are limited to 108
bytes; pytest's tmp paths are longer). Mirrors are configured the way operators do
it: a hosts dir `DIR/<registry>/hosts.toml` passed with `--hosts-dir`.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .process import ManagedProcess, run

NAMESPACE = "default"


def write_hosts_dir(hosts_dir: Path, registry_host: str, server_url: str,
                    mirror_url: str | None = None,
                    capabilities: Sequence[str] = ("pull", "resolve")) -> Path:
    """`hosts_dir/<registry_host>/hosts.toml`: try the mirror first, fall back to `server_url`."""
    d = hosts_dir / registry_host
    d.mkdir(parents=True, exist_ok=True)
    caps = ", ".join(f'"{c}"' for c in capabilities)
    text = f'server = "{server_url}"\n'
    if mirror_url is not None:
        text += f'\n[host."{mirror_url}"]\n  capabilities = [{caps}]\n  skip_verify = true\n'
    (d / "hosts.toml").write_text(text)
    return hosts_dir


@dataclass
class Containerd:
    """A running containerd; every method shells out to `ctr -a SOCKET`."""

    root: Path
    socket: Path
    process: ManagedProcess
    snapshotter: str = "overlayfs"

    def ctr(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ctr", "-a", str(self.socket), "-n", NAMESPACE, *args], timeout=timeout, check=check)

    def _registry_flags(self, hosts_dir: Path | None, plain_http: bool, platform: str | None,
                        user: str | None) -> list[str]:
        flags = []
        if hosts_dir is not None:
            flags += ["--hosts-dir", str(hosts_dir)]
        if plain_http:
            flags.append("--plain-http")
        if platform is not None:
            flags += ["--platform", platform]
        if user is not None:
            flags += ["--user", user]
        return flags

    def pull(self, ref: str, *, hosts_dir: Path | None = None, plain_http: bool = True,
             platform: str | None = None, user: str | None = None,
             timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """`ctr image pull`: fetch and unpack (fails for non-image artifacts)."""
        return self.ctr("image", "pull", "--snapshotter", self.snapshotter,
                        *self._registry_flags(hosts_dir, plain_http, platform, user), ref, timeout=timeout)

    def fetch(self, ref: str, *, hosts_dir: Path | None = None, plain_http: bool = True,
              platform: str | None = None, user: str | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`ctr content fetch`: content only, no unpack — works for artifacts too."""
        return self.ctr("content", "fetch", *self._registry_flags(hosts_dir, plain_http, platform, user),
                        ref, timeout=timeout)

    def image_names(self) -> list[str]:
        return self.ctr("image", "ls", "-q").stdout.split()

    def content_digests(self) -> set[str]:
        lines = self.ctr("content", "ls", "-q").stdout.split()
        return {line for line in lines if line.startswith("sha256:")}

    def read_blob(self, digest: str) -> bytes:
        """Small blobs only (manifests, configs): goes through a pipe into memory."""
        return subprocess.run(["ctr", "-a", str(self.socket), "-n", NAMESPACE, "content", "get", digest],
                              capture_output=True, check=True, timeout=60).stdout

    def forget(self, *refs: str) -> None:
        """Remove images, their snapshots and all content, so the next pull refetches every byte."""
        for ref in refs:
            self.ctr("image", "rm", "--sync", ref, check=False)
        # Garbage collection removes unreferenced content; remove stragglers explicitly
        # (e.g. blobs from `content fetch`, which labels them as image-owned).
        leftover = self.content_digests()
        if leftover:
            self.ctr("content", "rm", *sorted(leftover), check=False)
        leftover = self.content_digests()
        if leftover:
            raise RuntimeError(f"containerd still holds content after forget(): {sorted(leftover)}")

    def log(self) -> str:
        return self.process.stderr_text()


def _unmount_below(root: Path) -> None:
    """Overlay snapshots may leave mounts if containerd dies mid-unpack; never rmtree through them."""
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
    except OSError:
        return
    prefix = str(root).rstrip("/") + "/"
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


@contextlib.contextmanager
def start_containerd(snapshotter: str = "overlayfs") -> Iterator[Containerd]:
    root = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
    process: ManagedProcess | None = None
    try:
        socket = root / "c.sock"
        config = root / "config.toml"
        config.write_text(f"""version = 2
root = "{root / 'root'}"
state = "{root / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{root / 'c.ttrpc.sock'}"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{root / 'opt'}"
""")
        process = ManagedProcess(["containerd", "--config", str(config)],
                                 stdout=root / "containerd.out", stderr=root / "containerd.log").start()
        deadline = time.monotonic() + 15
        while True:
            if not process.alive():
                raise RuntimeError(f"containerd exited:\n{process.stderr_text()}")
            if socket.exists():
                probe = subprocess.run(["ctr", "-a", str(socket), "version"], capture_output=True, timeout=10)
                if probe.returncode == 0:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"containerd not ready:\n{process.stderr_text()}")
            time.sleep(0.05)
        yield Containerd(root, socket, process, snapshotter)
    finally:
        if process is not None:
            process.stop()
        _unmount_below(root)
        shutil.rmtree(root, ignore_errors=True)
