"""A blob's segments leave the page cache once an in-order reader has passed
them (fleetp2p/store/pagecache.py), and never before."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import Callable

from fleetp2p.store import Geometry
from fleetp2p.store.pagecache import RELEASE_DELAY, CacheReleaser, release
from fleetp2p.store.segments import segment_path
from harness.agent import Agent
from harness.images import Layout, Pushed
from harness.pagecache import resident_bytes, segment_files, settled_resident
from harness.regclient import RegistryClient
from harness.registry import Registry

MiB = 1 << 20
DELAY = 0.05


def segments(directory: Path, geometry: Geometry) -> list[Path]:
    """Segment files written through the page cache (dirty, not yet written back)."""
    paths = []
    for index in range(geometry.segments):
        path = segment_path(directory, index)
        path.write_bytes(os.urandom(geometry.segment_length(index)))
        paths.append(path)
    return paths


async def settle() -> None:
    """Past the delay, and past the release thread's work."""
    await asyncio.sleep(DELAY + 0.5)


async def test_segments_an_ordered_reader_passed_are_released_the_rest_stay(tmp_path: Path) -> None:
    # whole pages: fincore counts pages
    geometry = Geometry.for_size(3 * MiB - 4096, segment_size=MiB, piece_size=256 * 1024)
    files = segments(tmp_path, geometry)
    written = [p.read_bytes() for p in files]
    assert resident_bytes(files) == geometry.size

    releaser = CacheReleaser(tmp_path, geometry, delay=DELAY)
    releaser.passed(2 * MiB - 1)  # segment 1 is one byte short of passed
    assert resident_bytes(files[:1]) == MiB, "released before its delay"
    await settle()
    assert resident_bytes(files[:1]) == 0
    assert resident_bytes(files[1:]) == geometry.size - MiB

    releaser.passed(geometry.size)
    await settle()
    assert resident_bytes(files) == 0
    # written back before it was dropped: the bytes are all still there
    assert [p.read_bytes() for p in files] == written


async def test_a_disabled_releaser_keeps_everything(tmp_path: Path) -> None:
    geometry = Geometry.for_size(2 * MiB, segment_size=MiB, piece_size=256 * 1024)
    files = segments(tmp_path, geometry)
    releaser = CacheReleaser(tmp_path, geometry, enabled=False, delay=DELAY)
    releaser.passed(geometry.size)
    await settle()
    assert resident_bytes(files) == geometry.size


def test_a_file_removed_meanwhile_is_no_error(tmp_path: Path) -> None:
    release(tmp_path / "gone")


def test_an_agent_fetching_from_upstream_releases_what_it_verified(
        agent_factory: Callable[..., Agent], registry_anon: Registry, model_artifact: Layout,
        pushed: Callable[..., Pushed]) -> None:
    """No tracker: the blob streams from upstream and is hashed as it lands; its
    page cache goes once verified, and stays with `release_page_cache = false`."""
    p = pushed(registry_anon, model_artifact, "models/pagecache")
    weights = model_artifact.image.layers[0]
    for release_it in (True, False):
        agent = agent_factory(registry_anon, default=registry_anon, tracker="none",
                              release_page_cache=release_it)
        body = RegistryClient(agent.url).get_blob(p.repo, weights.digest).body
        assert "sha256:" + hashlib.sha256(body).hexdigest() == weights.digest
        blob_dir = agent.data_dir / "blobs" / "sha256" / weights.digest.split(":", 1)[1]
        if release_it:
            # this client reads behind the agent's hash: what it reads after a
            # segment's release comes back (from disk), and may stay
            limit = weights.size // 10
            resident = settled_resident(blob_dir, timeout=RELEASE_DELAY + 5, at_most=limit)
            assert resident <= limit, f"{resident} bytes of the blob still cached"
            # a cache hit now reads from disk (into the page cache in a thread,
            # registry/sendfile.py), whole and right
            again = RegistryClient(agent.url).get_blob(p.repo, weights.digest).body
            assert "sha256:" + hashlib.sha256(again).hexdigest() == weights.digest
        else:
            time.sleep(RELEASE_DELAY + 1)
            resident = resident_bytes(segment_files(blob_dir))
            assert resident >= 0.9 * weights.size, f"only {resident} bytes kept"
