"""How much a new page-cache page costs on this machine, as the fleet bench's
agents pay it: files written in 16 KiB `pwrite`s (libtorrent's block size).

    python bench/page_cache.py [--files 16] [--file-size 256MiB] [--dir DIR]

Prints each file's time and, at the end, the slowest file against the first.
On bare metal the ratio stays near 1. On a VM that hands freed memory back to
its hypervisor (virtio-balloon free page reporting) it jumps once the memory
the VM keeps backed is used up: on one 2-core VM, 0.08 s per 256 MiB file for
the first ~2.5 GB and 0.65-0.70 s after it; on another (README's current fleet
numbers), 0.10-0.14 s for the first ~3 GB and 0.4-1.0 s after it. A
16-node fleet phase writes 4 GiB of new page cache, so there that toll lands
on every node's writes, which one machine of a real fleet never sees.

The files live in a temp dir (default: under /var/tmp, on disk, not tmpfs)
that is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import human_bytes, parse_size  # noqa: E402

BLOCK = 16 * 1024


def write_file(path: Path, size: int, block: bytes) -> float:
    started = time.perf_counter()
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        for offset in range(0, size, len(block)):
            os.pwrite(fd, block, offset)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--file-size", default="256MiB")
    parser.add_argument("--dir", default="/var/tmp", help="parent of the temp dir")
    args = parser.parse_args()
    size = parse_size(args.file_size)
    if args.files < 2 or size < BLOCK:
        parser.error("need at least 2 files of at least 16KiB")
    block = os.urandom(BLOCK)
    workdir = Path(tempfile.mkdtemp(prefix="fleetp2p-page-cache-", dir=args.dir))
    times: list[float] = []
    try:
        for i in range(args.files):
            times.append(write_file(workdir / str(i), size, block))
            print(f"file {i + 1:3d}: {times[-1]:6.2f} s  ({human_bytes((i + 1) * size)} written)",
                  flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    worst = max(range(len(times)), key=times.__getitem__)
    print(f"slowest file (#{worst + 1}) / first file: {times[worst] / times[0]:.1f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
