"""Sanity tests of the harness itself, straight against the real software (no agent).

If these fail, a failure in test_clients.py says nothing about fleetp2p.
"""

from __future__ import annotations

import base64
import filecmp
import json
from email.message import Message
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

from harness.agent import metric_sum, parse_metrics, render_config, UpstreamEntry
from harness.containerd import Containerd
from harness.images import MODEL_ARTIFACT_TYPE, MODEL_WEIGHTS, Layout, Pushed, build_image, \
    build_model_artifact
from harness.process import CommandError
from harness.registry import Registry, start_registry
from harness.regclient import OCI_INDEX, OCI_MANIFEST
from harness.skopeo import Podman, skopeo_copy_to_oci

MiB = 1 << 20


def _status(url: str, headers: dict[str, str] | None = None,
            data: bytes | None = None) -> tuple[int, Message]:
    """Status and (case-insensitive) headers; Go servers send `Www-Authenticate`."""
    req = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# Registries and auth ----------------------------------------------------------------

def test_anonymous_registry_answers(registry_anon: Registry) -> None:
    assert _status(f"{registry_anon.url}/v2/")[0] == 200


def test_basic_registry_requires_password(registry_basic: Registry) -> None:
    url = f"{registry_basic.url}/v2/"
    status, headers = _status(url)
    assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Basic ")
    assert _status(url, {"Authorization": _basic(registry_basic.username or "", "wrong")})[0] == 401
    assert _status(url, {"Authorization": _basic(*registry_basic.creds)})[0] == 200  # type: ignore[misc]


def test_token_registry_bearer_flow(registry_token: Registry) -> None:
    """GET and OAuth-POST token requests both work; wrong or missing credentials get 401."""
    ts = registry_token.token_server
    assert ts is not None
    status, headers = _status(f"{registry_token.url}/v2/")
    assert status == 401
    assert headers.get("WWW-Authenticate", "").startswith(f'Bearer realm="{ts.realm}"')
    query = urllib.parse.urlencode({"service": ts.service, "scope": "repository:x/y:pull"})
    assert _status(f"{ts.realm}?{query}")[0] == 401
    assert _status(f"{ts.realm}?{query}", {"Authorization": _basic(registry_token.username or "", "no")})[0] == 401

    with urllib.request.urlopen(urllib.request.Request(
            f"{ts.realm}?{query}", headers={"Authorization": _basic(*registry_token.creds)}), timeout=10) as r:  # type: ignore[misc]
        token = json.load(r)["token"]
    assert _status(f"{registry_token.url}/v2/", {"Authorization": f"Bearer {token}"})[0] == 200
    assert _status(f"{registry_token.url}/v2/", {"Authorization": "Bearer x.y.z"})[0] == 401

    form = urllib.parse.urlencode({"grant_type": "password", "username": registry_token.username,
                                   "password": registry_token.password, "service": ts.service,
                                   "scope": "repository:x/y:pull", "client_id": "t"}).encode()
    with urllib.request.urlopen(urllib.request.Request(ts.realm, data=form), timeout=10) as r:
        assert "access_token" in json.load(r)
    bad = form.replace(registry_token.password.encode(), b"nope")  # type: ignore[union-attr]
    assert _status(ts.realm, data=bad)[0] == 401


def test_registry_cleans_up_after_failure(tmp_path: Path) -> None:
    """Process gone and temp dir removed even when the body raises."""
    seen: dict[str, object] = {}
    with pytest.raises(RuntimeError, match="boom"):
        with start_registry("token", base_dir=tmp_path) as reg:
            seen["dir"], seen["proc"] = reg.workdir, reg.process
            raise RuntimeError("boom")
    assert not Path(seen["dir"]).exists()  # type: ignore[arg-type]
    assert not seen["proc"].alive()  # type: ignore[attr-defined]


# Layouts, pushes and the access log ---------------------------------------------------

@pytest.mark.parametrize("name", ["registry_anon", "registry_basic", "registry_token"])
def test_push_keeps_digests(request: pytest.FixtureRequest, name: str, small_image: Layout,
                            multiplatform_image: Layout, pushed: Callable[..., Pushed]) -> None:
    reg: Registry = request.getfixturevalue(name)
    client = reg.client()
    for layout, repo, media_type in ((small_image, "team/app", OCI_MANIFEST),
                                     (multiplatform_image, "team/multi", OCI_INDEX)):
        p = pushed(reg, layout, repo)
        resp = client.get_manifest(repo, p.tag)
        assert resp.status == 200
        assert resp.header("Docker-Content-Digest") == layout.top.digest
        assert resp.header("Content-Type") == media_type
        for blob in layout.all_blobs():
            assert client.blob_exists(repo, blob.digest)


def test_artifact_push_by_http(registry_token: Registry, tmp_path: Path) -> None:
    art = build_model_artifact(tmp_path / "art", 3 * MiB, extra_files={"config.json": 100})
    from harness.images import http_push
    p = http_push(art, registry_token.client(), registry_token.host, "models/tiny")
    resp = registry_token.client().get_manifest("models/tiny", "model")
    assert resp.status == 200 and resp.header("Docker-Content-Digest") == p.digest
    manifest = json.loads(resp.body)
    assert manifest["artifactType"] == MODEL_ARTIFACT_TYPE
    assert manifest["layers"][0]["mediaType"] == MODEL_WEIGHTS
    assert manifest["layers"][0]["size"] == 3 * MiB


def test_access_log_counts_blob_bytes(registry_anon: Registry, small_image: Layout,
                                      pushed: Callable[..., Pushed]) -> None:
    pushed(registry_anon, small_image, "team/app")
    client = registry_anon.client()
    log = registry_anon.access_log
    mark = log.mark()
    layer = small_image.image.layers[1]
    assert client.request("HEAD", f"/v2/team/app/blobs/{layer.digest}").status == 200
    assert log.blob_bytes(mark) == 0, "HEAD must not count"
    body = client.get_blob("team/app", layer.digest).body
    part = client.get_blob("team/app", layer.digest, {"Range": "bytes=100-1099"})
    assert part.status == 206 and len(part.body) == 1000
    client.get_manifest("team/app", "v1")
    assert len(body) == layer.size
    assert log.blob_bytes(mark) == layer.size + 1000
    assert log.blob_bytes_by_digest(mark) == {layer.digest: layer.size + 1000}
    assert log.blob_bytes(mark, user_agent="fleetp2p-test-harness") == layer.size + 1000
    assert log.blob_bytes(mark, user_agent="containerd") == 0
    assert log.manifest_requests(mark) == 1


def test_layers_are_random_and_sized(tmp_path: Path) -> None:
    a = build_image(tmp_path / "a", [MiB, MiB])
    b = build_image(tmp_path / "b", [MiB])
    digests = [l.digest for l in a.image.layers + b.image.layers]
    assert len(set(digests)) == 3, "layers must never dedup across images"
    # Random data does not compress: the gzip'd tar is a little over the file size.
    assert all(MiB < l.size < MiB + 64 * 1024 for l in a.image.layers)


# Clients straight against the registry ----------------------------------------------

@pytest.mark.parametrize("name", ["registry_anon", "registry_basic", "registry_token"])
def test_containerd_pulls_direct_and_forgets(request: pytest.FixtureRequest, name: str, containerd: Containerd,
                                             small_image: Layout, pushed: Callable[..., Pushed],
                                             hosts_dir_for: Callable[..., Path]) -> None:
    """Direct pull works in every auth mode; forget() really makes the next pull refetch."""
    reg: Registry = request.getfixturevalue(name)
    p = pushed(reg, small_image, "team/app")
    hosts = hosts_dir_for(None, reg)
    user = f"{reg.username}:{reg.password}" if reg.username else None
    mark = reg.access_log.mark()
    containerd.pull(p.ref, hosts_dir=hosts, user=user)
    assert f"{p.ref}" in containerd.image_names()
    assert reg.access_log.blob_bytes(mark, user_agent="containerd") == small_image.image.blob_bytes
    containerd.forget(p.ref)
    assert containerd.image_names() == [] and containerd.content_digests() == set()
    mark = reg.access_log.mark()
    containerd.pull(p.ref, hosts_dir=hosts, user=user)
    assert reg.access_log.blob_bytes(mark) == small_image.image.blob_bytes


def test_containerd_without_credentials_fails(containerd: Containerd, registry_token: Registry,
                                              small_image: Layout, pushed: Callable[..., Pushed],
                                              hosts_dir_for: Callable[..., Path]) -> None:
    """Guards the client tests: containerd can't quietly bypass an agent on an auth registry."""
    p = pushed(registry_token, small_image, "team/app")
    with pytest.raises(CommandError):
        containerd.pull(p.ref, hosts_dir=hosts_dir_for(None, registry_token))


def test_containerd_uses_hosts_dir_mirror(containerd: Containerd, registry_factory: Callable[..., Registry],
                                          small_image: Layout, pushed: Callable[..., Pushed],
                                          hosts_dir_for: Callable[..., Path]) -> None:
    """A second registry as "mirror": containerd sends it everything, tagged with ?ns=."""
    upstream, mirror = registry_factory(), registry_factory()
    p = pushed(upstream, small_image, "team/app")
    pushed(mirror, small_image, "team/app")
    containerd.pull(p.ref, hosts_dir=hosts_dir_for(_as_agent(mirror), upstream))
    assert upstream.access_log.entries() and upstream.access_log.blob_bytes() == 0
    blob_gets = mirror.access_log.blob_gets(user_agent="containerd")
    assert sum(e.size for e in blob_gets) == small_image.image.blob_bytes
    assert all(f"ns={urllib.parse.quote(upstream.host)}" in e.query or f"ns={upstream.host}" in e.query
               for e in blob_gets)


def test_containerd_fetches_artifact(containerd: Containerd, registry_anon: Registry, tmp_path: Path,
                                     hosts_dir_for: Callable[..., Path], pushed: Callable[..., Pushed]) -> None:
    art = build_model_artifact(tmp_path / "art", 5 * MiB)
    p = pushed(registry_anon, art, "models/direct")
    containerd.fetch(p.ref, hosts_dir=hosts_dir_for(None, registry_anon))
    assert {b.digest for b in art.all_blobs()} | {p.digest} <= containerd.content_digests()


def test_skopeo_uses_registries_conf_mirror(registry_factory: Callable[..., Registry], small_image: Layout,
                                            pushed: Callable[..., Pushed], tmp_path: Path,
                                            registries_conf_for: Callable[..., Path]) -> None:
    """The unshare bind-mount trick: skopeo reads our registries.conf, the host's file is untouched."""
    before = Path("/etc/containers/registries.conf").read_bytes()
    upstream, mirror = registry_factory(), registry_factory()
    p = pushed(upstream, small_image, "team/app")
    pushed(mirror, small_image, "team/app")
    dest = tmp_path / "out"
    skopeo_copy_to_oci(p.ref, dest, registries_conf=registries_conf_for(upstream, _as_agent(mirror)))
    assert upstream.access_log.blob_bytes() == 0
    assert mirror.access_log.blob_bytes(user_agent="skopeo") == small_image.image.blob_bytes
    for blob in small_image.image.layers:
        assert filecmp.cmp(blob.path, dest / "blobs" / "sha256" / blob.digest[7:], shallow=False)
    assert Path("/etc/containers/registries.conf").read_bytes() == before


def test_podman_uses_registries_conf_mirror(registry_factory: Callable[..., Registry], small_image: Layout,
                                            pushed: Callable[..., Pushed],
                                            registries_conf_for: Callable[..., Path],
                                            podman_factory: Callable[[Path], Podman]) -> None:
    upstream, mirror = registry_factory(), registry_factory()
    p = pushed(upstream, small_image, "team/app")
    pushed(mirror, small_image, "team/app")
    podman = podman_factory(registries_conf_for(upstream, _as_agent(mirror)))
    podman.pull(p.ref)
    assert podman.image_digests() == [p.digest]
    assert upstream.access_log.blob_bytes() == 0
    assert mirror.access_log.blob_bytes(user_agent="containers/") == small_image.image.blob_bytes


# Agent helpers that need no agent ---------------------------------------------------------

def test_metrics_parser() -> None:
    text = """# HELP fleetp2p_served_bytes_total Bytes served
# TYPE fleetp2p_served_bytes_total counter
fleetp2p_served_bytes_total{source="local"} 10.0
fleetp2p_served_bytes_total{source="upstream"} 32.0
fleetp2p_requests_total{endpoint="blob",method="GET",status="200"} 3.0
fleetp2p_requests_total{endpoint="blob",method="HEAD",status="200"} 1.0
"""
    m = parse_metrics(text)
    assert m[("fleetp2p_served_bytes_total", frozenset({("source", "local")}))] == 10
    assert metric_sum(m, "fleetp2p_requests_total", endpoint="blob") == 4
    assert metric_sum(m, "fleetp2p_requests_total", endpoint="blob", method="GET") == 3
    assert metric_sum(m, "fleetp2p_requests_total", endpoint="manifest") == 0


def test_agent_config_is_valid_toml_for_the_agent(tmp_path: Path) -> None:
    """The TOML the harness writes loads through the agent's own config module."""
    from fleetp2p import config
    text = render_config({"listen": "127.0.0.1:5999", "data_dir": str(tmp_path), "default_registry":
                          "127.0.0.1:5001", "upstream_stall_timeout": 5.0},
                         [UpstreamEntry("127.0.0.1:5001", "http://127.0.0.1:5001"),
                          UpstreamEntry("127.0.0.1:5002", "http://127.0.0.1:5002", "u", 'p"w')])
    (tmp_path / "a.toml").write_text(text)
    cfg = config.load(str(tmp_path / "a.toml"))
    assert cfg.registry("127.0.0.1:5002").credentials() == ("u", 'p"w')
    assert cfg.default_registry == "127.0.0.1:5001" and cfg.listen_port == 5999


class _as_agent:
    """Lets a plain registry stand in for the agent as a mirror (only .url/.host are read)."""

    def __init__(self, registry: Registry) -> None:
        self.url, self.host = registry.url, registry.host
