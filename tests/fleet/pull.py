"""A blob client that runs on a fleet host, and the launcher that runs many at once.

As a script (`ip netns exec HOST python pull.py URL --start-at T`) it waits
until wall-clock time T, so clients on every host send their GET at the same
moment, then streams the body through sha256 and prints one JSON line:
status, seconds to headers / first body byte / each quarter of the body /
last byte, byte count, sha256.
The script imports only the standard library: it runs in a fresh interpreter
on each host. It times itself, so the numbers do not include the launcher's
own scheduling.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from harness.process import ManagedProcess

    from .netns import Host

BUFFER = 1 << 20
QUARTERS = 4


def fetch(url: str, timeout: float) -> dict:
    parts = urllib.parse.urlsplit(url)
    result: dict = {"url": url, "started_at": time.time()}
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""),
                     headers={"User-Agent": "fleet-test-pull"})
        resp = conn.getresponse()
        result["headers_s"] = time.monotonic() - t0
        result["status"] = resp.status
        result["content_length"] = resp.getheader("Content-Length")
        sha = hashlib.sha256()
        size = 0
        # when the stream passed 1/4, 2/4 and 3/4 of the body: how in order it arrives
        total = int(result["content_length"] or 0)
        marks = [total * k // QUARTERS for k in range(1, QUARTERS)] if total else []
        result["quarters_s"] = []
        while True:
            # read1: whatever has arrived (readinto would wait to fill the buffer,
            # and the first byte would be timed as the first MiB)
            chunk = resp.read1(BUFFER)
            if not chunk:
                break
            if size == 0:
                result["first_byte_s"] = time.monotonic() - t0
            sha.update(chunk)
            size += len(chunk)
            while marks and size >= marks[0]:
                marks.pop(0)
                result["quarters_s"].append(time.monotonic() - t0)
        result["bytes"] = size
        result["sha256"] = "sha256:" + sha.hexdigest()
    except Exception as e:  # noqa: BLE001 - reported to the launcher, which decides
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    result["done_s"] = time.monotonic() - t0
    result["done_at"] = time.time()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--start-at", type=float, default=0.0, help="wall-clock time to send the GET")
    parser.add_argument("--timeout", type=float, default=120.0, help="socket timeout (seconds)")
    args = parser.parse_args(argv)
    delay = args.start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    print(json.dumps(fetch(args.url, args.timeout)), flush=True)
    return 0


# The launcher (used from the test process) ------------------------------------

@dataclass
class PullResult:
    host: str
    status: int | None
    headers_s: float | None
    first_byte_s: float | None
    done_s: float | None
    started_at: float | None
    done_at: float | None
    bytes: int
    sha256: str | None
    error: str | None
    quarters_s: list[float] = field(default_factory=list)  # 1/4, 2/4, 3/4 of the body

    def verified(self, digest: str, size: int) -> bool:
        return self.status == 200 and self.bytes == size and self.sha256 == digest and not self.error


class Pull:
    """One client process on one host."""

    def __init__(self, host: "Host", url: str, start_at: float, timeout: float) -> None:
        self.host = host
        self.process: ManagedProcess = host.start(
            [sys.executable, str(Path(__file__).resolve()), url, "--start-at", f"{start_at:.6f}",
             "--timeout", str(timeout)], name=f"pull-{start_at:.3f}")

    def result(self, timeout: float) -> PullResult:
        proc = self.process.proc
        assert proc is not None
        try:
            proc.wait(timeout)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: count it as a failure
            self.process.kill9()
            return PullResult(self.host.name, None, None, None, None, None, None, 0, None,
                              f"client still running after {timeout}s")
        self.process.stop()
        self.host.network.untrack(self.process)
        lines = self.process.stdout_text(100_000).strip().splitlines()
        if not lines:
            return PullResult(self.host.name, None, None, None, None, None, None, 0, None,
                              f"client printed nothing (exit {proc.returncode}): "
                              f"{self.process.stderr_text(2000)}")
        data = json.loads(lines[-1])
        return PullResult(self.host.name, data.get("status"), data.get("headers_s"),
                          data.get("first_byte_s"), data.get("done_s"), data.get("started_at"),
                          data.get("done_at"), data.get("bytes", 0), data.get("sha256"),
                          data.get("error"), data.get("quarters_s", []))


def start_pulls(hosts: Sequence["Host"], path: str, *, delay: float = 1.0,
                timeout: float = 120.0) -> tuple[float, list[Pull]]:
    """Launch one client per host for `http://127.0.0.1:5050{path}`, all sending their GET
    at `time.time() + delay` (enough for every interpreter to start). Returns (start_at, pulls)."""
    start_at = time.time() + delay
    return start_at, [Pull(h, f"http://127.0.0.1:5050{path}", start_at, timeout) for h in hosts]


def pull_all(hosts: Sequence["Host"], path: str, *, delay: float = 1.0,
             timeout: float = 120.0) -> list[PullResult]:
    _, pulls = start_pulls(hosts, path, delay=delay, timeout=timeout)
    return [p.result(timeout + delay + 10) for p in pulls]


def blob_path(repo: str, digest: str) -> str:
    return f"/v2/{repo}/blobs/{digest}"


if __name__ == "__main__":
    sys.exit(main())
