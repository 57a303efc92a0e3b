"""Fixtures of the multi-host tests.

Session scope: the namespaces (registry, tracker, node1..node9 on 1 Gbit links)
and the upstream registry with its pushed blobs — building them is the slow
part and no test changes them. Function scope: a `Scene` holding the trackers,
Redis and agents of one test, so every test starts with cold stores and an
empty tracker. Everything is torn down in finalizers; namespaces left by a
killed run are removed when the network is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from .netns import Network, network, unavailable
from .scene import Scene
from .services import BlobFile, UpstreamRegistry, write_random_blob

MiB = 1 << 20
NODES = 9
NODE_RATE = "1gbit"


@pytest.fixture(scope="session")
def fleet_net() -> Iterator[Network]:
    reason = unavailable("docker-registry")
    if reason:
        pytest.skip(reason)
    with network() as net:
        net.add_host("registry", NODE_RATE, octet=2)
        net.add_host("tracker", NODE_RATE, octet=3)
        for i in range(1, NODES + 1):
            net.add_host(f"node{i}", NODE_RATE, octet=10 + i)
        yield net


@pytest.fixture(scope="session")
def upstream(fleet_net: Network) -> UpstreamRegistry:
    """Stopped with the network (its process is tracked there)."""
    return UpstreamRegistry(fleet_net["registry"], fleet_net.workdir / "registry").start()


@pytest.fixture(scope="session")
def blob(upstream: UpstreamRegistry, fleet_net: Network) -> Callable[[str, int], BlobFile]:
    """`blob(name, size) -> BlobFile`: a random blob pushed once as `fleet/<name>`.
    The local copy is deleted after the push (the registry's storage holds it)."""
    cache: dict[str, BlobFile] = {}
    scratch = fleet_net.workdir / "blobs"
    scratch.mkdir(exist_ok=True)

    def make(name: str, size: int) -> BlobFile:
        if name not in cache:
            path = scratch / name
            write_random_blob(path, size)
            cache[name] = upstream.push_blob(path, f"fleet/{name}")
            path.unlink()
        assert cache[name].size == size, f"blob {name} already made with another size"
        return cache[name]

    return make


@pytest.fixture
def scene(request: pytest.FixtureRequest, fleet_net: Network, upstream: UpstreamRegistry,
          tmp_path: Path) -> Iterator[Scene]:
    s = Scene(fleet_net, upstream, tmp_path / "scene")
    try:
        yield s
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is None or rep.failed:
            print(f"\n{s.report()}")
        s.close()
