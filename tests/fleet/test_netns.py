"""The namespace harness itself: isolation, shaping, and cleanup after failures
and after runs that died. If these fail, nothing in test_fleet.py means much."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness.process import run

from .netns import Host, Network, cleanup_stale, list_namespaces, network, unavailable

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")]

MiB = 1 << 20


def _throughput_mbit(sender: Host, receiver: Host, size: int) -> float:
    listener = receiver.call(lambda: socket.create_server((receiver.addr, 9000)))
    try:
        def receive() -> float:
            conn, _ = listener.accept()
            with conn:
                got, t0 = 0, time.monotonic()
                while chunk := conn.recv(MiB):
                    got += len(chunk)
                return got * 8 / (time.monotonic() - t0) / 1e6

        def send() -> None:
            with socket.create_connection((receiver.addr, 9000), timeout=10) as s:
                s.sendall(os.urandom(size))

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            rate = pool.submit(receive)
            sender.call(send)
            return rate.result(30)
    finally:
        listener.close()


def test_hosts_reach_each_other_only_through_shaped_links() -> None:
    with network() as net:
        a, b = net.add_host("a", "100mbit"), net.add_host("b", "100mbit")
        mbit = _throughput_mbit(a, b, 6 * MiB)
        assert 60 < mbit < 110, f"{mbit:.1f} Mbit/s on a 100mbit link"
        for host in (a, b):
            qdiscs = host.run("tc", "qdisc", "show", "dev", "eth0").stdout
            assert "tbf" in qdiscs and "rate 100Mbit" in qdiscs
            routes = host.run("ip", "route").stdout
            assert "default" not in routes, "a host must not reach anything outside the bridge"
        bridge_side = net.bridge_run("tc", "qdisc", "show").stdout
        assert bridge_side.count("tbf") == 2
        # the simulated wire is made as cheap as a real one (see netns.py)
        assert "generic-receive-offload: on" in a.run("ethtool", "-k", "eth0").stdout
        assert "generic-receive-offload: on" in net.bridge_run("ethtool", "-k", b.bridge_port).stdout
        if os.path.isdir("/proc/sys/net/bridge"):
            assert net.bridge_run("sysctl", "-n", "net.bridge.bridge-nf-call-iptables").stdout.strip() == "0"
    root_addrs = run(["ip", "-o", "addr"]).stdout
    assert "10.99.0." not in root_addrs


def test_jumbo_frames_cross_the_bridge() -> None:
    with network(mtu=9000) as net:
        a, b = net.add_host("a", "1gbit"), net.add_host("b", "1gbit")
        assert "mtu 9000" in a.run("ip", "link", "show", "eth0").stdout
        assert "mtu 9000" in net.bridge_run("ip", "link", "show", b.bridge_port).stdout
        listener = b.call(lambda: socket.create_server((b.addr, 9001)))

        def mss() -> int:
            with socket.create_connection((b.addr, 9001), timeout=10) as s:
                return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        try:
            assert a.call(mss) > 8000  # the path really carries 9000-byte frames
        finally:
            listener.close()
    with pytest.raises(ValueError, match="mtu"):
        Network(mtu=65536)


def test_teardown_after_a_failure() -> None:
    seen: dict[str, object] = {}
    with pytest.raises(RuntimeError, match="boom"):
        with network() as net:
            host = net.add_host("h1")
            seen["proc"] = host.start(["sleep", "600"], name="sleeper")
            seen["names"] = [net.bridge_ns, host.netns]
            seen["workdir"] = net.workdir
            raise RuntimeError("boom")
    assert not set(seen["names"]) & set(list_namespaces())  # type: ignore[arg-type]
    assert not seen["proc"].alive()  # type: ignore[attr-defined]
    assert not seen["workdir"].exists()  # type: ignore[attr-defined]


def test_stale_namespaces_of_dead_runs_are_removed() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale, live = f"fp-{gone.pid}-abcd-h1", f"fp-{os.getpid()}-beef-h1"
    run(["ip", "netns", "add", stale])
    run(["ip", "netns", "add", live])
    stale_dir = Path(tempfile.gettempdir()) / f"{stale}-workdir"
    (stale_dir / "logs").mkdir(parents=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "600"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while str(sleeper.pid) not in run(["ip", "netns", "pids", stale]).stdout:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert stale in cleanup_stale()
        assert sleeper.wait(10) is not None
        names = list_namespaces()
        assert stale not in names and live in names
        assert not stale_dir.exists()
    finally:
        shutil.rmtree(stale_dir, ignore_errors=True)
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        for name in (stale, live):
            run(["ip", "netns", "del", name], check=False)
