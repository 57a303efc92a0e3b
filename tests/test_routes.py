"""Which upstream registry and repository a `/v2/…` path means."""

from __future__ import annotations

import pytest

from fleetp2p.registry.routes import parse_target

DIGEST = "sha256:" + "ab" * 32
DEFAULT = "reg.example:5000"


@pytest.mark.parametrize("tail,ns,in_path,registry,repository,explicit", [
    # containerd: ?ns= names the registry; the whole path is the repository
    ("team/app/manifests/v1", "ghcr.io", True, "ghcr.io", "team/app", True),
    ("ghcr.io/owner/app/manifests/v1", "quay.io", True, "quay.io", "ghcr.io/owner/app", True),
    # registries.conf mirror location with a path: the registry leads the name
    ("ghcr.io/owner/app/manifests/v1", None, True, "ghcr.io", "owner/app", True),
    ("docker.io/alpine/manifests/3.19", None, True, "docker.io", "library/alpine", True),
    ("localhost/app/manifests/v1", None, True, "localhost", "app", True),
    # a bare mirror location: the default registry
    ("team/app/manifests/v1", None, True, DEFAULT, "team/app", False),
    ("ghcr.io/manifests/v1", None, True, DEFAULT, "ghcr.io", False),  # one component: a name
    ("my.group/app/manifests/v1", None, False, DEFAULT, "my.group/app", False),
])
def test_the_registry_comes_from_ns_then_the_path_then_the_default(tail, ns, in_path, registry,
                                                                   repository, explicit):
    target = parse_target(tail, ns, DEFAULT, in_path)
    assert (target.registry, target.repository, target.explicit_registry) == (registry, repository, explicit)


def test_a_blob_path_names_its_registry_too():
    target = parse_target(f"ghcr.io/owner/app/blobs/{DIGEST}", None, "docker.io")
    assert (target.endpoint, target.registry, target.repository, str(target.digest)) == \
        ("blob", "ghcr.io", "owner/app", DIGEST)
