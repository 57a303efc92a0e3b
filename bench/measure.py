"""Measuring: curl downloads with CPU accounting, the page cache (mincore,
fadvise), a process's RSS, and how busy the rest of the machine was.

Split from common.py, which starts and stops what is measured.
"""

from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import CHUNK, GB, BenchError, Proc, Workspace

# Page cache ----------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def cached_fraction(path: Path) -> float | None:
    """Share of the file's pages in the page cache (mincore), None if unknown.
    A directory (the agent keeps a blob as segment files) counts all its
    regular files. Mapping a file does not fault pages in, so asking does not warm it."""
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        sizes = [p.stat().st_size for p in files]
        fractions = [_file_cached_fraction(p) for p in files]
        if not files or None in fractions or sum(sizes) == 0:
            return None
        return sum(f * n for f, n in zip(fractions, sizes)) / sum(sizes)  # type: ignore[operator]
    return _file_cached_fraction(path)


def _file_cached_fraction(path: Path) -> float | None:
    try:
        size = path.stat().st_size
        if size == 0:
            return 1.0
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, _MAP_FAILED):
            return None
        try:
            pages = (size + os.sysconf("SC_PAGE_SIZE") - 1) // os.sysconf("SC_PAGE_SIZE")
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                return None
            return (pages - bytes(vec).count(0)) / pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def fmt_cached(fraction: float | None) -> str:
    return "?" if fraction is None else f"{fraction * 100:.0f}%"


def warm_page_cache(path: Path) -> None:
    """Read the file once so a server reads it from memory, not disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        while os.read(fd, CHUNK):
            pass
    finally:
        os.close(fd)


def evict_page_cache(path: Path) -> None:
    """Drop one file's pages: flush dirty pages first, since DONTNEED keeps them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def probe_drop_caches() -> str:
    """Whether the global `echo 1 > /proc/sys/vm/drop_caches` is allowed here.
    The benchmarks evict single files with fadvise instead (no privilege needed,
    and other warm files stay warm); this line only reports what the sandbox allows."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "works here (used once at start; per-file eviction uses fadvise DONTNEED)"
    except OSError as e:
        return f"not allowed here ({e.strerror}); per-file eviction uses fadvise DONTNEED"


# Downloads -----------------------------------------------------------------

@dataclass
class Transfer:
    status: int
    size: int
    speed: float  # bytes/s, curl's average over the whole transfer
    ttfb: float  # seconds to the first response byte (curl time_starttransfer)
    total: float  # seconds
    client_cpu: float = 0.0  # curl's user+system seconds
    server_cpu: float | None = None  # the serving process group's, when asked for

    @property
    def gbps(self) -> float:
        return self.speed / GB


def curl_get(url: str, expect_size: int, server: Proc | None = None,
             timeout: float = 900.0) -> Transfer:
    """One GET with curl into /dev/null: the client costs the same for every server.

    CPU seconds of curl and of `server` are recorded too: on two cores a fast
    transfer can be bound by the client, and then only the CPU column tells
    which server does more work per byte."""
    fmt = "%{http_code} %{size_download} %{speed_download} %{time_starttransfer} %{time_total}"
    server_cpu = server.cpu_seconds() if server is not None else 0.0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(["curl", "-s", "-S", "-o", "/dev/null", "-w", fmt, url],
                            capture_output=True, text=True, timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        code, size, speed, ttfb, total = result.stdout.split()
        transfer = Transfer(int(code), int(size), float(speed), float(ttfb), float(total),
                            client_cpu=(after.ru_utime + after.ru_stime
                                        - children.ru_utime - children.ru_stime),
                            server_cpu=(server.cpu_seconds() - server_cpu
                                        if server is not None else None))
    except ValueError:
        raise BenchError(f"curl {url}: exit {result.returncode}: {result.stderr.strip()}") from None
    if result.returncode != 0 or transfer.status != 200 or transfer.size != expect_size:
        raise BenchError(f"curl {url}: exit {result.returncode}, HTTP {transfer.status}, "
                         f"{transfer.size} of {expect_size} bytes: {result.stderr.strip()}")
    return transfer


# Memory --------------------------------------------------------------------

def _status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status, in bytes (empty once the process is gone)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    values[name] = int(parts[0]) * 1024
    except OSError:
        return {}
    return values


def rss_bytes(pid: int) -> int | None:
    return _status(pid).get("VmRSS")


class RssSampler:
    """Peak VmRSS of one process, sampled every `interval` seconds in a thread.

    The kernel's own high-water mark (VmHWM) is reset on entry through
    /proc/PID/clear_refs when allowed, so `hwm` catches a peak that falls
    between two samples. The peak sample's split into anonymous memory and
    file pages tells heap growth from mapped files (libtorrent may mmap
    what it seeds: those pages are page cache, counted in RSS)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.peak_anon = 0
        self.peak_file = 0
        self.samples = 0
        self.hwm: int | None = None
        self._hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> "RssSampler":
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5\n")  # 5 = reset the peak RSS counter
            self._hwm_reset = True
        except OSError:
            pass
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._hwm_reset:
            self.hwm = _status(self.pid).get("VmHWM")

    def _run(self) -> None:
        while True:
            status = _status(self.pid)
            rss = status.get("VmRSS")
            if rss is not None:
                self.samples += 1
                if rss > self.peak:
                    self.peak = rss
                    self.peak_anon = status.get("RssAnon", 0)
                    self.peak_file = status.get("RssFile", 0) + status.get("RssShmem", 0)
            if self._stop.wait(self.interval):
                return


# The machine --------------------------------------------------------------

def _cpu_jiffies() -> tuple[int, int]:
    """(busy, steal) jiffies of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


class MachineMonitor:
    """How much CPU everything else on the machine took while the benchmark ran.

    Other sessions' test suites on this two-core machine skew every number;
    a load average cannot tell them from the benchmark's own servers, so this
    subtracts the CPU of this process, its reaped children (curl, stopped
    servers) and its live servers from the machine's busy time."""

    NOISY = 0.2  # cores

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.started = time.monotonic()
        self.busy, self.steal = _cpu_jiffies()
        self.ours = self._our_cpu()

    def _our_cpu(self) -> float:
        t = os.times()
        live = sum(p.cpu_seconds() for p in self.ws.procs if p.alive())
        return t.user + t.system + t.children_user + t.children_system + live

    def report(self) -> str:
        ticks = os.sysconf("SC_CLK_TCK")
        busy, steal = _cpu_jiffies()
        elapsed = time.monotonic() - self.started
        others = max(0.0, (busy - self.busy) / ticks - (self._our_cpu() - self.ours)) / elapsed
        stolen = (steal - self.steal) / ticks / elapsed
        note = ("  <-- other work on this machine: numbers are unreliable"
                if others > self.NOISY or stolen > self.NOISY else "")
        return (f"machine: other processes used {others:.2f} of {os.cpu_count()} cores on average "
                f"during the run, hypervisor steal {stolen:.2f}{note}")
