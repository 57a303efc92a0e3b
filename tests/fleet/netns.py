"""A fleet of hosts on one machine: Linux network namespaces on a shaped bridge.

Layout (every name starts with `fp-<pid>-<random>-`, so parallel runs never
collide and leftovers of an aborted run can be recognised and removed):

    fp-…-br        holds the bridge `br0`; nothing else, no address
    fp-…-<host>    one per host: `lo` up, `eth0` = one end of a veth whose other
                   end (`v<octet>`) is a port of br0; address 10.99.0.<octet>/24

Both ends of every veth get `tc … root tbf rate R burst B latency 50ms`, so
a host's link is shaped in both directions (a host's egress on eth0, its
ingress as the bridge port's egress). The bucket B (`tbf_burst`) holds at
least four 64 KiB TCP segmentation-offload frames and 20 ms of the rate
(256 KiB at 100 Mbit/s): a smaller one makes the simulated wire lossier and
slower than a real one, see `tbf_burst`. Links have MTU 1500 unless the network
is made with another (`Network(mtu=9000)`: jumbo frames, as in many data
centres; a fleet simulated on one machine then spends far less CPU per byte
in the kernel, see bench/fleet.py). No address, route or device is ever put
in the root namespace, so nothing here can send traffic off the machine.

Every host on this machine shares its cores, so the simulated wire should
cost as little CPU as a real one. Two defaults of the kernel make it cost
more than it must, and are changed:
  * veths receive without GRO (real NICs have it on): both ends of every veth
    get `ethtool -K … gro on`, so consecutive segments cross the bridge and
    the receiving tbf as one packet;
  * with br_netfilter loaded (it is on this test machine), a bridge passes
    every frame through iptables; the bridge namespace turns that off
    (`net.bridge.bridge-nf-call-*=0`), as a switch would not filter.
Neither changes what a link carries or its rate; on the 16-node fleet bench
together they made the warm phase about 0.7 s (2-3 %) faster in 4 paired runs.

Processes run per host through `ip netns exec` (their own process group, so a
stop reaches their children). Small control-plane calls from the test process
itself (metrics scrapes, readiness polls, pushes to the registry) go through
`Host.call`, which runs a function on a worker thread that has joined the
host's namespace with setns(2): the thread's sockets live in that namespace,
so `127.0.0.1:5050` means that host's agent.

Teardown (`Network.close`, also from atexit) stops every process, then
deletes every namespace; `cleanup_stale()` removes what a killed run left.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from harness.process import ManagedProcess, pid_alive, run

T = TypeVar("T")

SUBNET = "10.99.0"
PREFIX_LEN = 24
NAME_PREFIX = "fp"
# fp-<pid of the run>-<4 hex>-<host or temp suffix>: the pid tells whether the run that
# made it is gone.
_OURS = re.compile(rf"^{NAME_PREFIX}-(?P<pid>\d+)-(?P<tag>[0-9a-f]{{4}})-.")
TBF_LATENCY = "50ms"
GSO_FRAME = 64 * 1024  # the largest skb TCP hands a veth with segmentation offload
TOKEN_SLACK_S = 0.020
BRIDGE_NF = ("iptables", "ip6tables", "arptables")
DEFAULT_MTU = 1500
MIN_MTU, MAX_MTU = 1280, 9000
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_RATE = re.compile(r"^(?P<n>[0-9]+(?:\.[0-9]+)?)(?P<unit>bit|kbit|mbit|gbit)$")
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def rate_bits(rate: str) -> float:
    """Bits per second of a tc rate string (`100mbit`, `1gbit`)."""
    m = _RATE.match(rate.strip().lower())
    if not m:
        raise ValueError(f"rate {rate!r}: expected e.g. 100mbit or 1gbit")
    return float(m.group("n")) * _RATE_UNITS[m.group("unit")]


def tbf_burst(rate: str) -> int:
    """The tbf bucket in bytes: at least 4 offload frames and 20 ms of `rate`.

    A bucket is also tbf's largest packet. With the 64 KiB once used here, every
    full 64 KiB frame from TCP (about 67 KiB with the headers of its segments)
    was over it, so tbf cut it into 45 packets in software and, with its queue
    full, dropped some of them: a sender's own congestion became losses on the
    wire, which a real NIC (it queues and sends an offload frame whole) never
    makes. (Tokens beyond the bucket are also lost, so a bucket of a few ms can
    make a link slower than its rate when a busy machine's timers fire late;
    20 ms leaves room for that.) On the 16-node fleet bench at 100 Mbit/s, with
    the 64 KiB bucket one node's egress dropped 9-10 % of its packets, 2-4 % of
    its segments were retransmitted, 17-26 retransmission timeouts fired, and
    the warm phase took 38-41 s; with 256 KiB: 1.3 %, 0.8 %, 5 timeouts and
    28.9 s. Bytes over any interval T stay within rate × T + bucket, so the
    bench's B/L bound still holds (256 KiB is 0.1 % of its blob)."""
    return max(4 * GSO_FRAME, int(rate_bits(rate) / 8 * TOKEN_SLACK_S))


def tbf(rate: str) -> tuple[str, ...]:
    """`tc qdisc … root` arguments that shape a link to `rate`."""
    return ("tbf", "rate", rate, "burst", str(tbf_burst(rate)), "latency", TBF_LATENCY)


def unavailable(*binaries: str) -> str | None:
    """Why the fleet cannot be built here (for a skip), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [b for b in ("ip", "tc", "ethtool", *binaries) if shutil.which(b) is None]
    return f"missing {', '.join(missing)}" if missing else None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["ip", *args], timeout=30, check=check)


def list_namespaces() -> list[str]:
    # `ip netns list` prints "name (id: N)" for namespaces with an id.
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _netns_pids(netns: str) -> list[int]:
    out = _ip("netns", "pids", netns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stale(name: str) -> bool:
    m = _OURS.match(name)
    return m is not None and not pid_alive(int(m.group("pid")))


def cleanup_stale() -> list[str]:
    """Delete namespaces of runs that no longer exist (name pattern `fp-<pid>-<tag>-*`
    whose pid is dead), killing the processes still inside them, and those runs'
    temp dirs. Returns the namespaces' names.

    Only our own pattern is touched; a namespace of a live run is left alone.
    """
    removed = []
    for name in list_namespaces():
        if _stale(name):
            _kill_pids(_netns_pids(name))
            _ip("netns", "del", name, check=False)
            removed.append(name)
    tmp = Path(tempfile.gettempdir())
    for path in tmp.glob(f"{NAME_PREFIX}-*"):
        if path.is_dir() and not path.is_symlink() and _stale(path.name):
            shutil.rmtree(path, ignore_errors=True)
    return removed


def stop_process(proc: ManagedProcess | None, timeout: float = 5.0) -> None:
    """Stop a process unless it has already been reaped: a reaped process's group id
    may belong to someone else by now, and ManagedProcess.stop signals the group."""
    if proc is not None and proc.proc is not None and proc.proc.returncode is None:
        proc.stop(timeout)


def _join_netns(path: str) -> None:
    """Thread initializer: move this OS thread (only) into the namespace at `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class Host:
    """One machine of the fleet: a namespace, an address, a shaped link."""

    network: "Network"
    name: str
    netns: str
    octet: int
    rate: str
    _executor: concurrent.futures.ThreadPoolExecutor | None = field(default=None, repr=False)

    @property
    def addr(self) -> str:
        return f"{SUBNET}.{self.octet}"

    @property
    def bridge_port(self) -> str:
        return f"v{self.octet}"

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd]

    def run(self, *cmd: str, timeout: float = 120, check: bool = True,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A short command on this host; raises with its output if it fails."""
        return run(self.argv(*cmd), timeout=timeout, check=check, env=env)

    def start(self, cmd: Sequence[str], *, name: str, env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> ManagedProcess:
        """A long-running process on this host, stopped by `Network.close` at the latest.
        Output goes to `<network workdir>/<host>.<name>.{out,err}`."""
        logs = self.network.workdir / "logs"
        logs.mkdir(exist_ok=True)
        proc = ManagedProcess(self.argv(*cmd), stdout=logs / f"{self.name}.{name}.out",
                              stderr=logs / f"{self.name}.{name}.err", env=env, cwd=cwd)
        self.network.track(proc)
        return proc.start()

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 120, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` on a thread inside this host's namespace."""
        if self._executor is None:
            with self.network.lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        max_workers=4, thread_name_prefix=f"netns-{self.name}",
                        initializer=_join_netns, initargs=(f"/run/netns/{self.netns}",))
        return self._executor.submit(fn, *args, **kwargs).result(timeout)

    def http_get(self, url: str, timeout: float = 10) -> tuple[int, bytes]:
        """GET from inside this host (status, body); HTTP errors are returned, not raised."""
        def get() -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()
        return self.call(get, timeout=timeout + 5)

    def set_rate(self, rate: str) -> None:
        """Reshape both ends of this host's link (`tbf` checks `rate` first)."""
        self.run("tc", "qdisc", "replace", "dev", "eth0", "root", *tbf(rate))
        self.network.bridge_run("tc", "qdisc", "replace", "dev", self.bridge_port, "root",
                                *tbf(rate))
        self.rate = rate

    def close_executor(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


class Network:
    """A bridge namespace plus hosts added with `add_host`; `close()` undoes everything."""

    def __init__(self, workdir: Path | None = None, mtu: int = DEFAULT_MTU) -> None:
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"mtu {mtu}: expected {MIN_MTU}..{MAX_MTU}")
        self.mtu = mtu
        self.prefix = f"{NAME_PREFIX}-{os.getpid()}-{secrets.token_hex(2)}"
        self.bridge_ns = f"{self.prefix}-br"
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hosts: dict[str, Host] = {}
        self.lock = threading.Lock()
        self._processes: list[ManagedProcess] = []
        self._namespaces: list[str] = []
        self._closed = False
        _OPEN.add(self)
        try:
            self._add_namespace(self.bridge_ns)
            self.bridge_run("ip", "link", "add", "br0", "type", "bridge")
            self.bridge_run("ip", "link", "set", "br0", "up")
            if Path("/proc/sys/net/bridge").is_dir():  # br_netfilter is loaded
                self.bridge_run("sysctl", "-qw", *(f"net.bridge.bridge-nf-call-{t}=0" for t in BRIDGE_NF))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def bridge_run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.bridge_ns, *cmd], timeout=30)

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, name: str, rate: str = "1gbit", octet: int | None = None) -> Host:
        """A new namespace `name` at 10.99.0.<octet> (next free from .11 if not given)."""
        if not re.fullmatch(r"[a-z0-9-]{1,20}", name) or name in self.hosts or name == "br":
            raise ValueError(f"bad or duplicate host name {name!r}")
        rate_bits(rate)
        used = {h.octet for h in self.hosts.values()}
        if octet is None:
            octet = next(o for o in range(11, 255) if o not in used)
        if octet in used or not 2 <= octet <= 254:
            raise ValueError(f"address {SUBNET}.{octet} is taken or invalid")
        host = Host(self, name, f"{self.prefix}-{name}", octet, rate)
        self._add_namespace(host.netns)
        self.hosts[name] = host
        # Created inside the bridge namespace with its peer moved straight into the
        # host's: the root namespace never sees either end.
        self.bridge_run("ip", "link", "add", host.bridge_port, "type", "veth",
                        "peer", "name", "eth0", "netns", host.netns)
        self.bridge_run("ip", "link", "set", host.bridge_port, "master", "br0", "up")
        self.bridge_run("ip", "link", "set", host.bridge_port, "mtu", str(self.mtu))
        _ip("-n", host.netns, "link", "set", "eth0", "mtu", str(self.mtu))
        _ip("-n", host.netns, "addr", "add", f"{host.addr}/{PREFIX_LEN}", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        host.run("tc", "qdisc", "add", "dev", "eth0", "root", *tbf(rate))
        self.bridge_run("tc", "qdisc", "add", "dev", host.bridge_port, "root", *tbf(rate))
        host.run("ethtool", "-K", "eth0", "gro", "on")
        self.bridge_run("ethtool", "-K", host.bridge_port, "gro", "on")
        return host

    def track(self, proc: ManagedProcess) -> None:
        with self.lock:
            self._processes.append(proc)

    def untrack(self, proc: ManagedProcess) -> None:
        with self.lock:
            if proc in self._processes:
                self._processes.remove(proc)

    def stop_all(self, timeout: float = 5.0) -> None:
        """Stop every process started on any host (in parallel: SIGTERM, then SIGKILL)."""
        with self.lock:
            procs, self._processes = self._processes, []
        threads = [threading.Thread(target=stop_process, args=(p, timeout)) for p in procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def close(self) -> None:
        """Idempotent: processes, namespace threads, namespaces, then the workdir."""
        if self._closed:
            return
        self._closed = True
        # A second Ctrl-C must not leave namespaces behind (signals reach the main thread only).
        in_main = threading.current_thread() is threading.main_thread()
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
        try:
            self.stop_all()
            for host in self.hosts.values():
                host.close_executor()
            for name in reversed(self._namespaces):  # hosts first, the bridge last
                _kill_pids(_netns_pids(name))
                _ip("netns", "del", name, check=False)
        finally:
            _OPEN.discard(self)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            if old_int is not None:
                signal.signal(signal.SIGINT, old_int)


_OPEN: set[Network] = set()


@atexit.register
def _close_leftovers() -> None:
    """An interrupted run (Ctrl-C between setup and a finalizer) still cleans up."""
    for net in list(_OPEN):
        with contextlib.suppress(Exception):
            net.close()


@contextlib.contextmanager
def network(workdir: Path | None = None, mtu: int = DEFAULT_MTU) -> Iterator[Network]:
    """`with network() as net:` — stale namespaces of dead runs are removed first."""
    cleanup_stale()
    net = Network(workdir, mtu)
    try:
        yield net
    finally:
        net.close()
