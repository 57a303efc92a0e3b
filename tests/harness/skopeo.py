"""skopeo and podman pulling through a registries.conf mirror.

skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF, so the file is bind-mounted over
/etc/containers/registries.conf inside a private mount namespace (`unshare -m`,
propagation private: the host's file is never touched). podman honours the
variable and gets throwaway --root/--runroot with the vfs driver (no mounts).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .process import run

SYSTEM_REGISTRIES_CONF = "/etc/containers/registries.conf"


def write_registries_conf(path: Path, upstream_host: str, mirror_host: str | None,
                          insecure: bool = True) -> Path:
    """One `[[registry]]` for the upstream with the agent as its (plain-http) mirror."""
    return write_mirrors_conf(path, {upstream_host: mirror_host}, insecure)


def write_mirrors_conf(path: Path, mirrors: dict[str, str | None], insecure: bool = True) -> Path:
    """A `[[registry]]` per upstream host, each with its mirror location (none if None)."""
    flag = "true" if insecure else "false"
    text = 'unqualified-search-registries = []\n'
    for upstream_host, mirror in mirrors.items():
        text += f'\n[[registry]]\nlocation = "{upstream_host}"\ninsecure = {flag}\n'
        if mirror is not None:
            text += f'\n[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = {flag}\n'
    path.write_text(text)
    return path


def skopeo(args: Sequence[str], *, registries_conf: Path | None = None, timeout: float = 300,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run skopeo; with `registries_conf`, inside a mount namespace that sees that file."""
    if registries_conf is None:
        return run(["skopeo", *args], timeout=timeout, check=check)
    script = 'mount --bind "$1" "$2" && shift 2 && exec skopeo "$@"'
    return run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                str(registries_conf), SYSTEM_REGISTRIES_CONF, *args], timeout=timeout, check=check)


def skopeo_copy_to_oci(ref: str, dest: Path, *, registries_conf: Path | None = None,
                       all_platforms: bool = False, debug: bool = False,
                       extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """`skopeo copy docker://REF oci:DEST` (plain-http upstream)."""
    args = ["--debug"] if debug else []
    args += ["copy", "--src-tls-verify=false", *extra]
    if all_platforms:
        args.append("--all")
    return skopeo([*args, f"docker://{ref}", f"oci:{dest}:pulled"], registries_conf=registries_conf)


@dataclass
class Podman:
    """A podman with private storage; `pull` uses the given registries.conf."""

    workdir: Path
    registries_conf: Path

    def _argv(self, *args: str) -> list[str]:
        return ["podman", "--root", str(self.workdir / "root"), "--runroot", str(self.workdir / "run"),
                "--tmpdir", str(self.workdir / "tmp"), "--storage-driver", "vfs",
                "--cgroup-manager", "cgroupfs", "--events-backend", "none", *args]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CONTAINERS_REGISTRIES_CONF"] = str(self.registries_conf)
        env["TMPDIR"] = str(self.workdir / "tmp")  # image copies stage here, not /var/tmp
        return env

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(self._argv(*args), timeout=timeout, check=check, env=self._env())

    def pull(self, ref: str, *, platform: str | None = None) -> subprocess.CompletedProcess[str]:
        extra = ["--platform", platform] if platform else []
        return self.run("pull", "--tls-verify=false", *extra, ref)

    def image_digests(self) -> list[str]:
        return self.run("images", "--no-trunc", "--format", "{{.Digest}}").stdout.split()


@contextlib.contextmanager
def podman_env(registries_conf: Path) -> Iterator[Podman]:
    workdir = Path(tempfile.mkdtemp(prefix="podman-", dir="/tmp"))
    (workdir / "tmp").mkdir()
    p = Podman(workdir, registries_conf)
    try:
        yield p
    finally:
        # vfs layers are plain dirs; `system reset` would also work but needs the same flags.
        subprocess.run(p._argv("rmi", "--all", "--force"), capture_output=True, timeout=120, env=p._env())
        shutil.rmtree(workdir, ignore_errors=True)


def podman_usable() -> str | None:
    """None if podman can run here, else why not (a skip reason)."""
    if shutil.which("podman") is None:
        return "podman is not installed"
    workdir = Path(tempfile.mkdtemp(prefix="podman-probe-", dir="/tmp"))
    try:
        (workdir / "tmp").mkdir()
        p = Podman(workdir, workdir / "registries.conf")
        write_registries_conf(p.registries_conf, "127.0.0.1:1", None)
        result = p.run("info", "--format", "{{.Store.GraphDriverName}}", check=False, timeout=60)
        if result.returncode != 0:
            return f"podman cannot run in this sandbox: {result.stderr.strip()[-500:]}"
        return None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
