"""Tag → manifest digest answers, trusted for a short TTL.

Tags move; digests don't. A fresh entry spares an upstream round trip; a
stale one is still served when upstream is unreachable (a fleet keeps
starting containers during a registry outage). Entries are small files so
they survive restarts.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from fleetp2p.store.files import atomic_write


@dataclass(frozen=True)
class TagEntry:
    digest: str
    media_type: str
    fetched_at: float

    def fresh(self, ttl: float, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) - self.fetched_at < ttl


class TagCache:
    def __init__(self, root: str | Path, ttl: float) -> None:
        self.dir = Path(root) / "tags"
        self.ttl = ttl
        self._memory: dict[tuple[str, str, str], TagEntry] = {}

    def _path(self, key: tuple[str, str, str]) -> Path:
        name = hashlib.sha256("\0".join(key).encode()).hexdigest()
        return self.dir / name[:2] / name

    def get(self, registry: str, repository: str, tag: str) -> TagEntry | None:
        """Blocking on a memory miss (reads a small file)."""
        key = (registry, repository, tag)
        entry = self._memory.get(key)
        if entry is None:
            try:
                raw = json.loads(self._path(key).read_bytes())
                entry = TagEntry(raw["digest"], raw["media_type"], raw["fetched_at"])
            except (OSError, ValueError, KeyError):
                return None
            self._memory[key] = entry
        return entry

    def put(self, registry: str, repository: str, tag: str, digest: str, media_type: str) -> TagEntry:
        """Blocking (writes a small file)."""
        key = (registry, repository, tag)
        entry = TagEntry(digest, media_type, time.time())
        self._memory[key] = entry
        atomic_write(self._path(key), json.dumps(entry.__dict__).encode())
        return entry

    def drop(self, registry: str, repository: str, tag: str) -> None:
        key = (registry, repository, tag)
        self._memory.pop(key, None)
        self._path(key).unlink(missing_ok=True)
