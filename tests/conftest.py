"""Fixtures exposing the real-software harness (tests/harness/).

Scopes: upstream registries, built layouts and pushes are per session (they are
read-only for tests); containerd, the agent and client config dirs are per test, so
every test starts with cold caches. Every fixture tears down in `finally`, and on a
failed test the agent's and registries' logs are printed with the teardown output.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

from harness.agent import Agent, UpstreamEntry, start_agent
from harness.containerd import Containerd, start_containerd, write_hosts_dir
from harness.images import Layout, Pushed, build_image, build_model_artifact, build_multiplatform, \
    http_push, skopeo_push
from harness.registry import Registry, start_registry
from harness.skopeo import Podman, podman_env, podman_usable, write_registries_conf

MiB = 1 << 20
MODEL_SIZE = int(os.environ.get("FLEETP2P_TEST_MODEL_MIB", "200")) * MiB


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Keep each phase's report on the item so fixtures know whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def _failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


# Upstream registries (session) ----------------------------------------------

@pytest.fixture(scope="session")
def harness_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("harness")


@pytest.fixture(scope="session")
def registry_anon(harness_dir: Path) -> Iterator[Registry]:
    """distribution 2.8, no auth."""
    with start_registry("anonymous", base_dir=harness_dir) as reg:
        yield reg


@pytest.fixture(scope="session")
def registry_basic(harness_dir: Path) -> Iterator[Registry]:
    """distribution 2.8 with htpasswd (bcrypt) basic auth; `.username/.password`."""
    with start_registry("basic", base_dir=harness_dir) as reg:
        yield reg


@pytest.fixture(scope="session")
def registry_token(harness_dir: Path) -> Iterator[Registry]:
    """distribution 2.8 with Bearer token auth; `.token_server` requires `.username/.password`."""
    with start_registry("token", base_dir=harness_dir) as reg:
        yield reg


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    """`make(mode="anonymous", **kw) -> Registry`: a fresh registry for this test only."""
    import contextlib
    with contextlib.ExitStack() as stack:
        def make(mode: str = "anonymous", **kw: object) -> Registry:
            return stack.enter_context(start_registry(mode, base_dir=tmp_path, **kw))  # type: ignore[arg-type]
        yield make


# Layouts and pushes (session) -------------------------------------------------

@pytest.fixture(scope="session")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """linux/amd64 image, three random gzip'd layers (≈0.5, 2, 4 MiB), tag `v1`."""
    return build_image(tmp_path_factory.mktemp("small-image"), [MiB // 2, 2 * MiB, 4 * MiB], tag="v1")


@pytest.fixture(scope="session")
def multiplatform_image(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """Index of linux/amd64 + linux/arm64 images, two unique layers each, tag `multi`."""
    return build_multiplatform(tmp_path_factory.mktemp("multi-image"), [MiB, 3 * MiB], tag="multi")


@pytest.fixture(scope="session")
def model_artifact(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Layout]:
    """OCI artifact (`artifactType` model manifest) with a FLEETP2P_TEST_MODEL_MIB (200) MiB raw
    weights layer and a small tokenizer file, tag `model`. Deleted at session end: pytest
    keeps old basetemps, and 200 MiB per run adds up."""
    root = tmp_path_factory.mktemp("model-artifact")
    try:
        yield build_model_artifact(root, MODEL_SIZE, extra_files={"tokenizer.json": 64 * 1024})
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pushed() -> Callable[[Registry, Layout, str], Pushed]:
    """`pushed(registry, layout, repo) -> Pushed`: push once per (registry, layout, repo).

    Images go through skopeo (digests preserved); artifacts through plain HTTP.
    """
    cache: dict[tuple[str, str, str], Pushed] = {}

    def push(registry: Registry, layout: Layout, repo: str) -> Pushed:
        # The workdir, not the port: a per-test registry may reuse a dead one's port.
        key = (str(registry.workdir), str(layout.root), repo)
        if key not in cache:
            if "artifact" in layout.images:
                cache[key] = http_push(layout, registry.client(), registry.host, repo)
            else:
                cache[key] = skopeo_push(layout, registry.host, repo, creds=registry.creds)
        return cache[key]

    return push


# Agent (per test) ----------------------------------------------------------------

def upstream_entry(registry: Registry, with_creds: bool = True) -> UpstreamEntry:
    """The agent's `[[registries]]` entry for a harness registry (credentials included)."""
    if with_creds and registry.username is not None:
        return UpstreamEntry(registry.host, registry.url, registry.username, registry.password)
    return UpstreamEntry(registry.host, registry.url)


def _dump(title: str, text: str) -> None:
    print(f"\n===== {title} =====\n{text}")


@pytest.fixture
def agent_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """`make(*registries, default=None, **settings) -> Agent` (started, ready).

    Each registry becomes a `[[registries]]` entry with its credentials; `default`
    sets `default_registry`; extra settings go to the top of the TOML file.
    """
    import contextlib
    started: list[Agent] = []
    with contextlib.ExitStack() as stack:
        def make(*registries: Registry | UpstreamEntry, default: Registry | str | None = None,
                 **settings: object) -> Agent:
            entries = [r if isinstance(r, UpstreamEntry) else upstream_entry(r) for r in registries]
            default_name = default.host if isinstance(default, Registry) else default
            agent = stack.enter_context(start_agent(entries, default_name, base_dir=tmp_path, **settings))
            started.append(agent)
            return agent
        try:
            yield make
        finally:
            if _failed(request):
                for a in started:
                    _dump(f"agent {a.url} log (tail)", a.log())


@pytest.fixture
def agent(agent_factory: Callable[..., Agent], registry_anon: Registry, registry_basic: Registry,
          registry_token: Registry) -> Agent:
    """An agent knowing all three session registries (with credentials); default: anonymous."""
    return agent_factory(registry_anon, registry_basic, registry_token, default=registry_anon)


# Clients (per test) -------------------------------------------------------------

@pytest.fixture
def containerd(request: pytest.FixtureRequest) -> Iterator[Containerd]:
    """A private containerd (overlayfs snapshotter) driven via `ctr`."""
    with start_containerd() as c:
        try:
            yield c
        finally:
            if _failed(request):
                _dump("containerd log (tail)", c.log())


@pytest.fixture
def hosts_dir_for(tmp_path: Path) -> Callable[..., Path]:
    """`hosts_dir_for(agent_or_None, *registries) -> Path`: a containerd --hosts-dir where each
    registry's hosts.toml names the agent as a pull+resolve mirror (None: no mirror)."""
    counter = iter(range(1_000_000))

    def make(agent: Agent | None, *registries: Registry) -> Path:
        d = tmp_path / f"hosts-{next(counter)}"
        for reg in registries:
            write_hosts_dir(d, reg.host, reg.url, agent.url if agent is not None else None)
        return d

    return make


@pytest.fixture
def registries_conf_for(tmp_path: Path) -> Callable[[Registry, Agent | None], Path]:
    """`registries_conf_for(upstream, agent_or_None) -> Path`: containers registries.conf with the
    agent as the insecure mirror of `upstream`."""
    counter = iter(range(1_000_000))

    def make(upstream: Registry, agent: Agent | None) -> Path:
        return write_registries_conf(tmp_path / f"registries-{next(counter)}.conf", upstream.host,
                                     agent.host if agent is not None else None)

    return make


@pytest.fixture(scope="session")
def podman_skip_reason() -> str | None:
    return podman_usable()


@pytest.fixture
def podman_factory(podman_skip_reason: str | None) -> Iterator[Callable[[Path], Podman]]:
    """`make(registries_conf) -> Podman` with private vfs storage; skips if podman can't run here."""
    if podman_skip_reason:
        pytest.skip(podman_skip_reason)
    import contextlib
    with contextlib.ExitStack() as stack:
        yield lambda conf: stack.enter_context(podman_env(conf))


@pytest.fixture(autouse=True)
def _dump_registry_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """On failure, show what the session registries saw during this test (access log tail)."""
    regs = [request.getfixturevalue(n) for n in ("registry_anon", "registry_basic", "registry_token")
            if n in request.fixturenames]
    marks = {r.host: len(r.access_log.path.read_text(errors="replace").splitlines()) for r in regs}
    yield
    if _failed(request):
        for r in regs:
            lines = r.access_log.path.read_text(errors="replace").splitlines()[marks[r.host]:]
            _dump(f"registry {r.mode} {r.host} access log during test", "\n".join(lines[-60:]))
