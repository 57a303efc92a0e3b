"""Turning a `/v2/…` path into a validated request, before anything touches
the disk or the network."""

from __future__ import annotations

from dataclasses import dataclass

from fleetp2p.errors import NameInvalid, Unsupported
from fleetp2p.oci.reference import (Digest, docker_hub_repository, validate_name,
                                    validate_reference, validate_registry)


@dataclass(frozen=True)
class Target:
    endpoint: str  # base, manifest, blob
    registry: str = ""
    repository: str = ""
    reference: str = ""  # tag or digest text
    digest: Digest | None = None
    explicit_registry: bool = False


def parse_target(tail: str, ns: str | None, default_registry: str) -> Target:
    """`tail` is the path after `/v2/`; `ns` is containerd's ?ns= parameter."""
    if tail == "":
        return Target("base")
    if tail.endswith("/blobs/uploads") or "/blobs/uploads/" in tail:
        raise Unsupported("this registry is a read-only mirror: pushes are not supported")
    registry = validate_registry(ns) if ns else default_registry
    for marker, endpoint in (("/manifests/", "manifest"), ("/blobs/", "blob")):
        name, sep, reference = tail.rpartition(marker)
        if not sep:
            continue
        repository = docker_hub_repository(registry, validate_name(name))
        if endpoint == "blob":
            digest = Digest.parse(reference)
            return Target(endpoint, registry, repository, reference, digest, bool(ns))
        parsed = validate_reference(reference)
        digest = parsed if isinstance(parsed, Digest) else None
        return Target(endpoint, registry, repository, reference, digest, bool(ns))
    if tail.endswith("/tags/list") or tail == "_catalog" or "/referrers/" in tail:
        raise Unsupported("listing tags, catalogs and referrers is not supported by this mirror",
                          status=404)
    raise NameInvalid(f"not a registry API path: /v2/{tail}", status=404)
