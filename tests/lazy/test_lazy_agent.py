"""Lazy range reads through a real agent in front of a real registry, with
layers made by the real tools (ctr-remote eStargz, skopeo zstd:chunked), and
requests shaped as stargz-snapshotter and containers/image send them."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.request

import pytest

from fleetp2p.lazy import detect, fetch_ranges, read_file

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ALIGN = 50_000  # stargz-snapshotter's fetch alignment


def push_image(registry, repo: str, layer) -> str:
    """A one-layer image whose layer descriptor carries the tool's annotations."""
    client = registry.client()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    layer_digest = "sha256:" + hashlib.sha256(layer.blob).hexdigest()
    client.push_blob(repo, config_digest, config)
    client.push_blob(repo, layer_digest, layer.blob)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": layer.media_type, "digest": layer_digest,
                            "size": layer.size, "annotations": layer.annotations}]}
    client.put_manifest(repo, "v1", json.dumps(manifest).encode(), OCI_MANIFEST)
    return layer_digest


def http(method: str, url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def parts(headers: dict, body: bytes) -> list[tuple[int, int, bytes]]:
    boundary = re.search(r"boundary=(\S+)", headers["Content-Type"]).group(1).encode()
    found = []
    for part in body.split(b"--" + boundary)[1:-1]:
        head, _, data = part.partition(b"\r\n\r\n")
        first, last = map(int, re.search(rb"bytes (\d+)-(\d+)/", head).groups())
        found.append((first, last, data[:-2]))
    return found


def aligned(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Inclusive ranges widened to ALIGN-byte blocks, merged, as the snapshotter does."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        a, b = start // ALIGN * ALIGN, min(-(-end // ALIGN) * ALIGN, size) - 1
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


@pytest.fixture
def lazy_setup(registry_factory, agent_factory):
    def make(layer, **settings):
        registry = registry_factory()
        digest = push_image(registry, "lazy/app", layer)
        agent = agent_factory(registry, default=registry, **settings)
        status, _, _ = http("GET", f"{agent.url}/v2/lazy/app/manifests/v1?ns={registry.host}",
                            {"Accept": OCI_MANIFEST})
        assert status == 200
        return registry, agent, digest
    return make


def toc_of(layer):
    plan = detect(layer.media_type, layer.annotations, layer.size)
    location = plan.location or plan.parse_footer(layer.blob[-plan.footer_fetch_size:], layer.size)
    return plan.parse_toc(layer.read(location.offset, location.end), location)


def test_stargz_snapshotter_request_sequence(ctr_remote_layers, lazy_setup, expected_files):
    layer = ctr_remote_layers["estargz"]
    registry, agent, digest = lazy_setup(layer)
    since = registry.access_log.mark()
    blob_url = f"{agent.url}/v2/lazy/app/blobs/{digest}"  # no ?ns=, as the snapshotter sends
    status, headers, body = http("GET", blob_url, {"Range": "bytes=0-1"})
    assert status == 206 and body == layer.blob[:2]
    assert headers["Content-Range"] == f"bytes 0-1/{layer.size}"
    status, headers, _ = http("HEAD", blob_url)
    assert status == 200 and int(headers["Content-Length"]) == layer.size
    toc = toc_of(layer)
    wanted = ["etc/hello.txt", "data/text.txt"]
    spans = fetch_ranges([c for path in wanted for c in toc.chunks_for(path)])
    ranges = aligned(spans, layer.size)
    header = "bytes=" + ",".join(f"{a}-{b}" for a, b in ranges)
    status, headers, body = http("GET", blob_url, {"Range": header, "Accept-Encoding": "identity"})
    assert status == 206
    got = parts(headers, body) if len(ranges) > 1 else [(*ranges[0], body)]
    assert [(a, b) for a, b, _ in got] == ranges
    for a, b, data in got:
        assert data == layer.blob[a:b + 1]
    assembled = {p: read_file(toc, p, lambda s, e: layer.blob[s:e]) for p in wanted}
    assert assembled == {p: expected_files[p] for p in wanted}
    registry.access_log.settle()
    moved = registry.access_log.blob_bytes(since)
    assert moved < 0.6 * layer.size, f"moved {moved} of {layer.size}: not lazy"
    assert agent.metric("fleetp2p_lazy_requested_bytes_total") > 0
    assert agent.metric("fleetp2p_lazy_layers") == 1


@pytest.mark.parametrize("name", ["zstdchunked-skopeo", "estargz"])
def test_one_part_per_range_in_request_order(name, ctr_remote_layers, skopeo_zstd_layer, lazy_setup):
    layer = skopeo_zstd_layer if name == "zstdchunked-skopeo" else ctr_remote_layers[name]
    registry, agent, digest = lazy_setup(layer)
    toc = toc_of(layer)
    spans = fetch_ranges(toc.chunks_for("bin/big.bin"))[:3]
    ranges = [(e - 10, e - 1) for _, e in reversed(spans)] + [(spans[0][0], spans[0][0] + 4)] * 2
    header = "bytes=" + ",".join(f"{a}-{b}" for a, b in ranges)
    status, headers, body = http("GET", f"{agent.url}/v2/lazy/app/blobs/{digest}?ns={registry.host}",
                                 {"Range": header})
    assert status == 206
    got = parts(headers, body)
    assert [(a, b) for a, b, _ in got] == ranges
    assert all(data == layer.blob[a:b + 1] for a, b, data in got)


def test_corrupted_chunk_upstream_is_reported_never_served(ctr_remote_layers, lazy_setup):
    layer = ctr_remote_layers["estargz"]
    registry, agent, digest = lazy_setup(layer)
    toc = toc_of(layer)
    chunk = toc.chunks_for("bin/big.bin")[1]
    stored = next(registry.workdir.rglob(f"blobs/sha256/{digest[7:9]}/{digest[7:]}/data"))
    raw = bytearray(stored.read_bytes())
    middle = chunk.compressed_offset + chunk.compressed_size // 2
    raw[middle] ^= 0xFF
    stored.write_bytes(bytes(raw))
    status, _, body = http("GET", f"{agent.url}/v2/lazy/app/blobs/{digest}",
                           {"Range": f"bytes={middle - 100}-{middle + 100}"})
    assert status == 404 and b"BLOB_UNKNOWN" in body and b"verification" in body
    assert agent.metric("fleetp2p_verification_failures_total", kind="chunk") >= 1
    # an untouched file of the same layer still reads fine
    hello = fetch_ranges(toc.chunks_for("etc/hello.txt"))[0]
    status, _, body = http("GET", f"{agent.url}/v2/lazy/app/blobs/{digest}",
                           {"Range": f"bytes={hello[0]}-{hello[1] - 1}"})
    assert status == 206 and body == layer.blob[hello[0]:hello[1]]
