"""How much of a file the page cache holds, measured with util-linux's `fincore`."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterable


def resident_bytes(paths: Iterable[Path]) -> int:
    """Bytes of `paths` in the page cache right now (fincore(1) is in util-linux,
    essential on Debian: a machine without it fails here, loudly)."""
    names = [str(p) for p in paths]
    if not names:
        return 0
    fincore = shutil.which("fincore")
    assert fincore is not None, "fincore (util-linux) is needed to see the page cache"
    out = subprocess.run([fincore, "--bytes", "--raw", "--noheadings", "--output", "RES", *names],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    return sum(int(line) for line in out.split())


def segment_files(blob_dir: Path) -> list[Path]:
    """A stored blob's segment files (named by index; not its small marker files)."""
    return [p for p in blob_dir.iterdir() if p.name.isdigit()]


def settled_resident(blob_dir: Path, timeout: float, at_most: int = 0) -> int:
    """Resident bytes of a blob's segment files once they are down to `at_most`
    or `timeout` passes, whichever comes first (releases happen a few seconds
    after the agent's hash passed a segment; a client reading behind it brings
    back what it reads, and readahead)."""
    deadline = time.monotonic() + timeout
    while True:
        resident = resident_bytes(segment_files(blob_dir))
        if resident <= at_most or time.monotonic() >= deadline:
            return resident
        time.sleep(0.2)
