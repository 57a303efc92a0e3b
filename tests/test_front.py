"""The registry front's HTTP contract: validation, errors, ranges, headers."""

from __future__ import annotations

import hashlib
import os
import re

import aiohttp
import pytest
import yarl

from tests.inprocess import FakeUpstream, agent_for, running, wait_stored

BLOB = os.urandom(200_000)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


@pytest.fixture
async def front(tmp_path):
    upstream = FakeUpstream()
    upstream.add_blob(BLOB)
    upstream.manifests["v1"] = (b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}',
                                "application/vnd.oci.image.index.v1+json")
    async with running(upstream.app()) as up, agent_for(up, tmp_path) as (agent, server):
        server.upstream = upstream
        server.agent = agent
        yield server


async def request(server, method: str, path: str, headers=None):
    url = yarl.URL(f"http://127.0.0.1:{server.port}{path}", encoded=True)  # no client-side normalization
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers or {}) as resp:
            return resp.status, resp.headers, await resp.read()


async def test_base(front):
    status, headers, body = await request(front, "GET", "/v2/")
    assert status == 200 and headers["Docker-Distribution-API-Version"] == "registry/2.0"


@pytest.mark.parametrize("path,code", [
    ("/v2/UPPER/blobs/" + DIGEST, "NAME_INVALID"),
    ("/v2/a//b/blobs/" + DIGEST, "NAME_INVALID"),
    ("/v2/../etc/blobs/" + DIGEST, "NAME_INVALID"),
    ("/v2/app/blobs/sha256:abc", "DIGEST_INVALID"),
    ("/v2/app/blobs/md5:" + "0" * 32, "DIGEST_INVALID"),
    ("/v2/app/blobs/sha256:" + "G" * 64, "DIGEST_INVALID"),
    ("/v2/app/manifests/-bad-tag", "MANIFEST_INVALID"),
    ("/v2/app/manifests/" + "t" * 129, "MANIFEST_INVALID"),
    ("/v2/app/blobs/" + DIGEST + "?ns=bad%20host", "NAME_INVALID"),
    ("/v2/bad_host.example/app/blobs/" + DIGEST, "NAME_INVALID"),
])
async def test_bad_input_is_rejected_before_any_fetch(front, path, code):
    status, headers, body = await request(front, "GET", path)
    assert status in (400, 404)
    assert f'"{code}"' in body.decode()
    assert front.upstream.log == []


@pytest.mark.parametrize("method,path", [
    ("POST", "/v2/app/blobs/uploads/"),
    ("PUT", "/v2/app/manifests/v1"),
    ("DELETE", "/v2/app/blobs/" + DIGEST),
    ("PATCH", "/v2/app/blobs/uploads/x"),
])
async def test_push_is_unsupported(front, method, path):
    status, headers, body = await request(front, method, path)
    assert status == 405 and b'"UNSUPPORTED"' in body
    assert headers["Allow"] == "GET, HEAD"


async def test_head_blob_does_not_download(front):
    status, headers, body = await request(front, "HEAD", f"/v2/app/blobs/{DIGEST}")
    assert status == 200 and body == b""
    assert headers["Content-Length"] == str(len(BLOB))
    assert headers["Docker-Content-Digest"] == DIGEST
    assert [m for m, _, _ in front.upstream.log] == ["HEAD"]


@pytest.mark.parametrize("header,status,content_range,expected", [
    ("bytes=0-1", 206, f"bytes 0-1/{len(BLOB)}", BLOB[0:2]),
    ("bytes=100-", 206, f"bytes 100-{len(BLOB) - 1}/{len(BLOB)}", BLOB[100:]),
    ("bytes=-7", 206, f"bytes {len(BLOB) - 7}-{len(BLOB) - 1}/{len(BLOB)}", BLOB[-7:]),
    ("bytes=5-1", 200, None, BLOB),
])
async def test_single_range(front, header, status, content_range, expected):
    got_status, headers, body = await request(front, "GET", f"/v2/app/blobs/{DIGEST}", {"Range": header})
    assert got_status == status
    assert headers.get("Content-Range") == content_range
    assert body == expected
    assert headers["Accept-Ranges"] == "bytes"


async def test_unsatisfiable_range(front):
    status, headers, body = await request(front, "GET", f"/v2/app/blobs/{DIGEST}",
                                          {"Range": f"bytes={len(BLOB)}-"})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(BLOB)}"


async def test_multi_range_one_part_per_range_in_order(front):
    ranges = [(50000, 50099), (0, 9), (0, 9), (len(BLOB) - 5, len(BLOB) - 1)]
    header = "bytes=" + ",".join(f"{a}-{b}" for a, b in ranges)
    for warm in (False, True):  # while downloading, then from the store
        status, headers, body = await request(front, "GET", f"/v2/app/blobs/{DIGEST}", {"Range": header})
        assert status == 206
        boundary = re.search(r"boundary=(\S+)", headers["Content-Type"]).group(1)
        assert int(headers["Content-Length"]) == len(body)
        parts = body.split(f"--{boundary}".encode())
        assert parts[-1] == b"--\r\n"
        parts = parts[1:-1]
        assert len(parts) == len(ranges)
        for part, (a, b) in zip(parts, ranges):
            head, _, data = part.partition(b"\r\n\r\n")
            assert f"Content-Range: bytes {a}-{b}/{len(BLOB)}".encode() in head
            assert data[:-2] == BLOB[a:b + 1] and data.endswith(b"\r\n")


async def test_manifest_headers_and_accept_forwarding(front):
    accept_lines = [("Accept", "application/vnd.oci.image.index.v1+json"),
                    ("Accept", "application/vnd.docker.distribution.manifest.v2+json, */*")]
    async with aiohttp.ClientSession() as session:
        async with session.get(front.make_url("/v2/app/manifests/v1"), headers=accept_lines) as resp:
            body = await resp.read()
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            assert resp.headers["Docker-Content-Digest"] == digest
            assert resp.headers["ETag"] == f'"{digest}"'
    forwarded = front.upstream.log[-1][2]
    assert forwarded == ("application/vnd.oci.image.index.v1+json, "
                         "application/vnd.docker.distribution.manifest.v2+json, */*")
    # by digest, HEAD: same headers, no body, no upstream request
    before = len(front.upstream.log)
    status, headers, body = await request(front, "HEAD", f"/v2/app/manifests/{digest}")
    assert status == 200 and body == b"" and headers["Docker-Content-Digest"] == digest
    assert len(front.upstream.log) == before


async def test_metrics_exposed(front):
    await request(front, "GET", f"/v2/app/blobs/{DIGEST}")
    await request(front, "GET", f"/v2/app/blobs/{DIGEST}")
    status, _, body = await request(front, "GET", "/metrics")
    text = body.decode()
    assert 'fleetp2p_served_bytes_total{source="local"} 200000.0' in text
    assert 'fleetp2p_served_bytes_total{source="upstream"} 200000.0' in text
    assert 'fleetp2p_requests_total{endpoint="blob",method="GET",status="200"} 2.0' in text
    assert "fleetp2p_time_to_first_byte_seconds_bucket" in text


async def test_blob_spanning_many_segments(tmp_path):
    """Segments are separate files: every read that crosses a boundary must be seamless."""
    data = os.urandom(300_000)
    upstream = FakeUpstream()
    digest = upstream.add_blob(data)
    async with running(upstream.app()) as up, \
            agent_for(up, tmp_path, segment_size="64KiB", piece_size="16KiB") as (agent, server):
        ranges = [(65530, 65540), (0, 299_999), (131_000, 200_000)]
        header = "bytes=" + ",".join(f"{a}-{b}" for a, b in ranges)
        for _ in range(2):  # streamed while downloading, then from the store
            status, _, body = await request(server, "GET", f"/v2/app/blobs/{digest}")
            assert status == 200 and body == data
            status, headers, body = await request(server, "GET", f"/v2/app/blobs/{digest}",
                                                  {"Range": "bytes=65530-65545"})
            assert status == 206 and body == data[65530:65546]
            status, headers, body = await request(server, "GET", f"/v2/app/blobs/{digest}",
                                                  {"Range": header})
            assert status == 206 and all(data[a:b + 1] in body for a, b in ranges)
        await wait_stored(agent)
        entry = agent.store.get(agent.store.entries()[0].digest)
        assert entry.geometry.segments == 5
        assert sorted(p.name for p in entry.path.iterdir()) == ["0", "1", "2", "3", "4", "complete"]
