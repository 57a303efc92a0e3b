"""Lazy reads across the fleet: the second host reading a file of an eStargz
layer gets its chunks from the first host's agent, not from the registry.

The layer is real ctr-remote output (tests/lazy's session fixture, 256 KiB
chunks, so the file read here spans two chunks). Each host reads the file
the way an operator would, with `fleetp2p get` run inside the host's
namespace against its own agent: manifest, footer, TOC, then the file's
chunks, all by range through the agent.

What the agent does, and so what is asserted to the byte: footer, TOC and
chunks are all tried at peers first (the TOC is verified by the digest the
manifest gives, the chunks by the TOC). So on the second host
`fleetp2p_lazy_fetched_bytes_total` is exactly footer + TOC + the file's
compressed chunks, all from the peer, and the registry's access log shows
no blob GET from it at all.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest

from fleetp2p.lazy import TocLocation, detect, fetch_ranges

from . import lazy_fixtures
from .agents import FleetAgent, Snapshot
from .scene import Scene
from .services import fleetp2p_command, wait_until

# Importable once lazy_fixtures has put tests/lazy on sys.path (as test_lazy_cli does).
from test_lazy_agent import push_image  # isort: skip
from writers import RealLayer  # isort: skip

pytestmark = pytest.mark.slow

# tests/lazy's session fixtures, visible to this module's tests under their own names
# (ctr_remote_layers needs the other two).
ctr_remote_layers = lazy_fixtures.ctr_remote_layers
expected_files = lazy_fixtures.expected_files
lazy_containerd = lazy_fixtures.lazy_containerd
source_layout = lazy_fixtures.source_layout

REPO = "fleet/lazy"
# 320 kB, two 256 KiB chunks. Not bin/big.bin: that is most of this small layer, and
# the agent serves a read of half a layer or more by pulling the layer whole.
FILE = "data/sparse.bin"


@dataclass(frozen=True)
class Layout:
    """Where the bytes of one file's read live in the layer, computed from the blob
    itself (as a reader with the whole layer would), to check the agents against."""

    footer: int  # bytes the agent reads from the end to find the TOC
    toc: TocLocation
    chunk_spans: list[tuple[int, int]]

    @property
    def toc_bytes(self) -> int:
        assert self.toc.length is not None
        return self.toc.length

    @property
    def chunk_bytes(self) -> int:
        return sum(end - start for start, end in self.chunk_spans)

    @property
    def index_gets(self) -> list[int]:
        """Byte counts of the two GETs every cold agent sends to find the chunks."""
        return [self.footer, self.toc_bytes]


def layout_of(layer: RealLayer, path: str) -> Layout:
    plan = detect(layer.media_type, layer.annotations, layer.size)
    assert plan is not None, "ctr-remote's layer is not recognised as eStargz"
    start, end = plan.first_range(layer.size)
    location = plan.parse_footer(layer.read(start, end), layer.size)
    assert location.end is not None
    toc = plan.parse_toc(layer.read(location.offset, location.end), location)
    return Layout(end - start, location, fetch_ranges(toc.chunks_for(path)))


def lazy_bytes(agent: FleetAgent) -> dict[str, float]:
    return {s: agent.metric("fleetp2p_lazy_fetched_bytes_total", source=s)
            for s in ("upstream", "peer")}


def get_file(agent: FleetAgent, ref: str, out: Path) -> dict:
    """`fleetp2p get` run on the agent's host, against that host's agent."""
    result = agent.host.run(*fleetp2p_command("get", ref, FILE, "-o", str(out), "--agent",
                                              agent.url, "--json"), timeout=60)
    return json.loads(result.stdout)


def wait_announced(scene: Scene, tracker_url: str, digest: str, holder: FleetAgent) -> None:
    """Until the tracker names `holder` as a peer for the layer (its msgpack API):
    the second host asks the tracker once and caches the answer for a few
    seconds, so it must not ask before the first host's announce landed."""
    def named() -> bool:
        status, body = scene.net["tracker"].http_get(f"{tracker_url}/v1/blobs/{digest}/peers")
        peers = msgpack.unpackb(body, raw=False)["peers"] if status == 200 else []
        return any(p.get("host") == holder.host.addr for p in peers)
    wait_until(named, 10, f"tracker naming {holder.host.name} for {digest}")


def test_second_host_reads_lazy_chunks_from_first(scene: Scene, ctr_remote_layers,
                                                  expected_files) -> None:
    started = time.monotonic()
    layer = ctr_remote_layers["estargz"]
    upstream = scene.upstream
    digest = upstream.host.call(push_image, upstream, REPO, layer)
    ref = f"{upstream.name}/{REPO}:v1"
    where = layout_of(layer, FILE)
    assert where.chunk_bytes < layer.size / 2, "the read must be small enough to be served lazily"
    print(f"layer {layer.size} B; footer {where.footer} B, TOC {where.toc_bytes} B, "
          f"{FILE}: {where.chunk_bytes} B of chunks in {len(where.chunk_spans)} span(s)")

    tracker = scene.tracker()
    # No background prefetch: the byte counts below must be those of the one read.
    first, second = scene.start_agents(scene.nodes[:2], tracker.url, lazy_prefetch=False)

    got = get_file(first, ref, scene.workdir / "first.bin")
    assert got["mode"] == "lazy"
    assert (scene.workdir / "first.bin").read_bytes() == expected_files[FILE]
    assert lazy_bytes(first) == {"upstream": where.footer + where.toc_bytes + where.chunk_bytes,
                                 "peer": 0}
    wait_announced(scene, tracker.url, digest, first)

    mark = upstream.access_log.mark()
    got = get_file(second, ref, scene.workdir / "second.bin")
    assert got["mode"] == "lazy"
    assert got["bytes_fetched"] == where.footer + where.toc_bytes + where.chunk_bytes
    assert (scene.workdir / "second.bin").read_bytes() == expected_files[FILE]

    fetched = lazy_bytes(second)
    print(f"second host: lazy bytes fetched {fetched}; served {Snapshot.of(second).served}")
    everything = where.footer + where.toc_bytes + where.chunk_bytes
    assert fetched == {"peer": everything, "upstream": 0}, \
        "second host: footer, TOC and chunks must all come from the peer"
    assert first.metric("fleetp2p_peer_served_bytes_total") == everything
    served = Snapshot.of(second).served
    assert served["peer"] == everything and served["upstream"] == 0

    # The registry's own account (its log has no Range header, but every GET's byte
    # count): the second host caused no blob read; over the whole scenario the
    # footer, TOC and chunk spans left the registry exactly once.
    upstream.access_log.settle()
    later = [(e.status, e.size) for e in upstream.access_log.blob_gets(mark) if e.blob_digest == digest]
    assert later == [], f"the registry sent the second host layer bytes: {later}"
    every = [e.size for e in upstream.access_log.blob_gets(scene.log_mark) if e.blob_digest == digest]
    spans = [end - start for start, end in where.chunk_spans]
    assert sorted(every) == sorted(where.index_gets + spans), \
        f"layer GETs at the registry over the scenario: {every}"
    print(f"layer GETs at the registry (bytes): {every}; after the first host: {later}; "
          f"test body took {time.monotonic() - started:.1f} s")
