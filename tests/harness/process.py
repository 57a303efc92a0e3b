"""A subprocess the harness owns: own process group, output in files, always reaped.

Each process gets its own session so stop/kill reach its children too (by its
process-group id, never by name). An atexit hook kills anything still running if
pytest itself is interrupted between a start and the fixture's finally.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

_LIVE: set["ManagedProcess"] = set()


class ManagedProcess:
    """One long-running program with stdout/stderr captured to files."""

    def __init__(self, argv: Sequence[str], *, stdout: Path, stderr: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.stdout_path = stdout
        self.stderr_path = stderr
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ManagedProcess":
        if self.alive():
            raise RuntimeError(f"{self.argv[0]} already running")
        # Append so a restart keeps the earlier run's output for post-mortems.
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=self.cwd, start_new_session=True)
        _LIVE.add(self)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(10)
        # Children that ignored SIGTERM still die with the group.
        self._signal_group(signal.SIGKILL)
        _LIVE.discard(self)
        return self.proc.returncode

    def kill9(self) -> int | None:
        """SIGKILL with no chance to clean up: simulates a crash."""
        if self.proc is None:
            return None
        self._signal_group(signal.SIGKILL)
        self.proc.wait(10)
        _LIVE.discard(self)
        return self.proc.returncode

    def stderr_text(self, tail: int = 8000) -> str:
        try:
            data = self.stderr_path.read_bytes()
        except OSError:
            return ""
        return data[-tail:].decode(errors="replace")

    def stdout_text(self, tail: int = 8000) -> str:
        try:
            data = self.stdout_path.read_bytes()
        except OSError:
            return ""
        return data[-tail:].decode(errors="replace")


def pid_alive(pid: int) -> bool:
    """Whether a process exists (one we may not signal still counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run(argv: Sequence[str], *, timeout: float = 120, check: bool = True,
        env: Mapping[str, str] | None = None, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short command; on failure raise with its full output (pytest shows it)."""
    result = subprocess.run(list(argv), capture_output=True, timeout=timeout, env=env, input=input)
    text = subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(errors="replace"),
                                       result.stderr.decode(errors="replace"))
    if check and result.returncode != 0:
        raise CommandError(text)
    return text


class CommandError(RuntimeError):
    """A command the harness ran exited non-zero; carries its output."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        super().__init__(f"command failed (exit {result.returncode}): {' '.join(map(str, result.args))}\n"
                         f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}")


@atexit.register
def _kill_leftovers() -> None:
    for p in list(_LIVE):
        p.kill9()
