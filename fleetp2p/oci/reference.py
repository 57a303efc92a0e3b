"""Validation of repository names, tags and digests with the distribution-spec grammar.

Everything a client sends is checked here before it reaches the store or
becomes part of a filesystem path or an upstream URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fleetp2p.errors import DigestInvalid, NameInvalid, ManifestInvalid

# distribution-spec: <name> path components
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG_RE = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
MAX_NAME_LENGTH = 255
# host[:port] as containerd passes it in ?ns= and as [[registries]] name it.
REGISTRY_RE = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*"
    r"(?::[0-9]{1,5})?$|^\[[0-9a-fA-F:.]+\](?::[0-9]{1,5})?$"
)

_HEX_LENGTH = {"sha256": 64, "sha512": 128}


@dataclass(frozen=True, order=True)
class Digest:
    """A validated content digest. Only sha256 and sha512 are accepted:
    we must be able to verify every byte we serve."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> "Digest":
        if not DIGEST_RE.match(text):
            raise DigestInvalid(f"invalid digest {text!r}")
        algorithm, _, encoded = text.partition(":")
        expected = _HEX_LENGTH.get(algorithm)
        if expected is None:
            raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}", status=400)
        if len(encoded) != expected or not re.fullmatch(r"[a-f0-9]+", encoded):
            raise DigestInvalid(f"invalid {algorithm} digest {text!r}")
        return cls(algorithm, encoded)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.match(name):
        raise NameInvalid(f"invalid repository name {name!r}")
    return name


def validate_registry(host: str) -> str:
    if not REGISTRY_RE.match(host):
        raise NameInvalid(f"invalid registry host {host!r}")
    return host


def split_registry(name: str) -> tuple[str | None, str]:
    """Docker's rule: a first component with a dot or a port, or `localhost`,
    is a registry host (`ghcr.io/owner/app`), anything else the start of a
    repository of the default registry (`library/alpine`)."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None, name


def is_digest(reference: str) -> bool:
    return ":" in reference


def validate_reference(reference: str) -> str | Digest:
    """A manifest reference is either a tag or a digest."""
    if is_digest(reference):
        return Digest.parse(reference)
    if not TAG_RE.match(reference):
        raise ManifestInvalid(f"invalid tag {reference!r}", status=400)
    return reference


@dataclass(frozen=True)
class ImageRef:
    """A user-facing reference such as `docker.io/library/alpine:3.19` or
    `127.0.0.1:5000/app@sha256:…`, as the CLI accepts it."""

    registry: str
    repository: str
    reference: str  # tag or digest string

    @classmethod
    def parse(cls, text: str, default_registry: str = "docker.io") -> "ImageRef":
        host, rest = split_registry(text)
        registry = default_registry if host is None else host
        if "@" in rest:
            repository, _, reference = rest.partition("@")
            Digest.parse(reference)
        else:
            repository, reference = rest, "latest"
            slash = rest.rfind("/")
            colon = rest.rfind(":")
            if colon > slash:
                repository, reference = rest[:colon], rest[colon + 1:]
            validate_reference(reference)
        validate_registry(registry)
        repository = docker_hub_repository(registry, repository)
        validate_name(repository)
        return cls(registry, repository, reference)

    @property
    def is_digest(self) -> bool:
        return is_digest(self.reference)

    def __str__(self) -> str:
        sep = "@" if self.is_digest else ":"
        return f"{self.registry}/{self.repository}{sep}{self.reference}"


DOCKER_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


def docker_hub_repository(registry: str, repository: str) -> str:
    """Docker Hub serves official images under `library/`: `alpine` is `library/alpine`."""
    if registry in DOCKER_HUB_NAMES and "/" not in repository:
        return f"library/{repository}"
    return repository
