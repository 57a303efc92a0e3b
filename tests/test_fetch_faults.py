"""The fetch path against an upstream that misbehaves on purpose."""

from __future__ import annotations

import asyncio
import hashlib
import os

import aiohttp
import pytest

from tests.inprocess import FakeUpstream, agent_for, running

BLOB = os.urandom(3 * 1024 * 1024 + 17)


async def get(server, path: str, **kwargs) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url(path), **kwargs) as resp:
            return resp.status, dict(resp.headers), await resp.read()


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.mark.parametrize("fault", [None, "error500", "error429", "cut", "stall", "ignore_range"])
async def test_blob_survives_upstream_fault(tmp_path, upstream, fault):
    digest = upstream.add_blob(BLOB)
    # a cut/stall forces a resume, which the second fault then affects
    upstream.faults = [fault, "ignore_range" if fault == "ignore_range" else None]
    async with running(upstream.app()) as up, agent_for(up, tmp_path) as (agent, front):
        status, headers, body = await get(front, f"/v2/app/blobs/{digest}")
        assert status == 200
        assert hashlib.sha256(body).hexdigest() == digest.split(":")[1]
        assert headers["Docker-Content-Digest"] == digest
        # the second request is a pure cache hit
        sent = upstream.blob_bytes_sent
        status, _, again = await get(front, f"/v2/app/blobs/{digest}")
        assert status == 200 and again == BLOB and upstream.blob_bytes_sent == sent
    if fault in ("cut", "stall"):
        ranges = [r for (_, _, r) in upstream.log if r]
        assert ranges and ranges[0].startswith("bytes=") and ranges[0] != "bytes=0-"


async def test_corrupt_upstream_is_never_served_complete(tmp_path, upstream):
    digest = upstream.add_blob(BLOB)
    upstream.faults = ["corrupt"]
    async with running(upstream.app()) as up, agent_for(up, tmp_path) as (agent, front):
        with pytest.raises(aiohttp.ClientPayloadError):
            await get(front, f"/v2/app/blobs/{digest}")
        assert not agent.store.entries()
        assert not (tmp_path / "blobs" / "sha256" / digest.split(":")[1]).exists()
        metrics = agent.metrics.verification_failures.labels("blob")._value.get()
        assert metrics == 1
        # the next request refetches and succeeds
        status, _, body = await get(front, f"/v2/app/blobs/{digest}")
        assert status == 200 and body == BLOB


async def test_concurrent_requests_coalesce(tmp_path, upstream):
    digest = upstream.add_blob(BLOB)
    async with running(upstream.app()) as up, agent_for(up, tmp_path) as (agent, front):
        results = await asyncio.gather(*(get(front, f"/v2/app/blobs/{digest}") for _ in range(8)))
        assert all(status == 200 and body == BLOB for status, _, body in results)
        gets = [entry for entry in upstream.log if entry[0] == "GET"]
        assert len(gets) == 1
        assert upstream.blob_bytes_sent == len(BLOB)


async def test_upstream_down_is_a_404_with_oci_error(tmp_path, upstream):
    digest = upstream.add_blob(BLOB)
    async with running(upstream.app()) as up:
        port = up.port
    # nothing listens on the port any more
    from fleetp2p import config as config_mod
    from fleetp2p.agent import Agent
    cfg = config_mod.from_dict({"data_dir": str(tmp_path), "upstream_retries": 2, "upstream_backoff": 0.01,
                                "tracker": "none",
                                "registries": [{"name": f"127.0.0.1:{port}",
                                                "url": f"http://127.0.0.1:{port}"}]}).validate()
    async with running(Agent(cfg).build_app()) as front:
        status, headers, body = await get(front, f"/v2/app/blobs/{digest}")
        assert status == 404
        assert b'"BLOB_UNKNOWN"' in body
        status, _, body = await get(front, "/v2/app/manifests/latest")
        assert status == 404 and b"MANIFEST_UNKNOWN" in body


async def test_an_upstream_that_never_answers_times_out(tmp_path):
    """Headers that never come: each attempt gives up after the header timeout
    (the larger of the stall and connect timeouts), then the client gets a 404."""
    async def silent(request):
        await asyncio.sleep(30)
        return aiohttp.web.Response()

    app = aiohttp.web.Application()
    app.router.add_route("*", "/v2/{tail:.+}", silent)
    async with running(app) as up, agent_for(up, tmp_path, upstream_retries=1,
                                             upstream_connect_timeout=0.5,
                                             upstream_stall_timeout=0.5) as (agent, front):
        started = asyncio.get_running_loop().time()
        status, _, body = await get(front, "/v2/app/blobs/sha256:" + "ab" * 32)
        took = asyncio.get_running_loop().time() - started
    assert status == 404 and b"BLOB_UNKNOWN" in body
    assert took < 5, f"{took:.1f} s"


async def test_unknown_blob_and_manifest(tmp_path, upstream):
    async with running(upstream.app()) as up, agent_for(up, tmp_path) as (agent, front):
        status, _, body = await get(front, "/v2/app/blobs/sha256:" + "0" * 64)
        assert status == 404 and b"BLOB_UNKNOWN" in body
        status, _, body = await get(front, "/v2/app/manifests/nope")
        assert status == 404 and b"MANIFEST_UNKNOWN" in body


async def test_stale_tag_served_when_upstream_fails(tmp_path, upstream):
    manifest = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}'
    upstream.manifests["v1"] = (manifest, "application/vnd.oci.image.manifest.v1+json")
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    async with running(upstream.app()) as up, agent_for(up, tmp_path, tag_ttl=0) as (agent, front):
        status, headers, body = await get(front, "/v2/app/manifests/v1", headers=accept)
        assert status == 200 and body == manifest
        upstream.faults = ["error500"] * 10
        status, headers, body = await get(front, "/v2/app/manifests/v1", headers=accept)
        assert status == 200 and body == manifest
        assert headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(manifest).hexdigest()


async def test_tampered_manifest_by_digest_is_rejected(tmp_path, upstream):
    manifest = b'{"schemaVersion":2}'
    wrong = "sha256:" + "1" * 64
    upstream.manifests[wrong] = (manifest, "application/vnd.oci.image.manifest.v1+json")
    async with running(upstream.app()) as up, agent_for(up, tmp_path) as (agent, front):
        status, _, body = await get(front, f"/v2/app/manifests/{wrong}")
        assert status == 404
        assert agent.metrics.verification_failures.labels("manifest")._value.get() == 1
