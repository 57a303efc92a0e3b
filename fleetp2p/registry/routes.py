"""Turning a `/v2/…` path into a validated request, before anything touches
the disk or the network."""

from __future__ import annotations

from dataclasses import dataclass

from fleetp2p.errors import NameInvalid, Unsupported
from fleetp2p.oci.reference import (Digest, docker_hub_repository, split_registry, validate_name,
                                    validate_reference, validate_registry)


@dataclass(frozen=True)
class Target:
    endpoint: str  # base, manifest, blob
    registry: str = ""
    repository: str = ""
    reference: str = ""  # tag or digest text
    digest: Digest | None = None
    explicit_registry: bool = False


def parse_target(tail: str, ns: str | None, default_registry: str,
                 registry_in_path: bool = True) -> Target:
    """`tail` is the path after `/v2/`; `ns` is containerd's ?ns= parameter."""
    if tail == "":
        return Target("base")
    if tail.endswith("/blobs/uploads") or "/blobs/uploads/" in tail:
        raise Unsupported("this registry is a read-only mirror: pushes are not supported")
    for marker, endpoint in (("/manifests/", "manifest"), ("/blobs/", "blob")):
        name, sep, reference = tail.rpartition(marker)
        if not sep:
            continue
        registry, name, explicit = upstream_of(name, ns, default_registry, registry_in_path)
        repository = docker_hub_repository(registry, validate_name(name))
        if endpoint == "blob":
            digest = Digest.parse(reference)
            return Target(endpoint, registry, repository, reference, digest, explicit)
        parsed = validate_reference(reference)
        digest = parsed if isinstance(parsed, Digest) else None
        return Target(endpoint, registry, repository, reference, digest, explicit)
    if tail.endswith("/tags/list") or tail == "_catalog" or "/referrers/" in tail:
        raise Unsupported("listing tags, catalogs and referrers is not supported by this mirror",
                          status=404)
    raise NameInvalid(f"not a registry API path: /v2/{tail}", status=404)


def upstream_of(name: str, ns: str | None, default_registry: str,
                registry_in_path: bool) -> tuple[str, str, bool]:
    """(registry, repository name, whether the client named the registry).

    containerd names the registry in ?ns=. podman, skopeo and CRI-O never
    do, but a registries.conf mirror location with a path
    (`127.0.0.1:5050/ghcr.io`) puts it in front of the repository
    (`/v2/ghcr.io/owner/app/…`): that lets one agent mirror several
    registries for them, where a bare location can only mean the default."""
    if ns:
        return validate_registry(ns), name, True
    if registry_in_path:
        host, rest = split_registry(name)
        if host is not None:
            return validate_registry(host), rest, True
    return default_registry, name, False
