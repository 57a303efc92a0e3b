"""Walk a reference down to every blob a pull needs.

- image manifest (OCI or Docker v2): its config and layers;
- OCI image index / Docker manifest list: the manifests of the selected
  platforms (nested indexes are walked too), then their blobs;
- OCI artifact (an image manifest with `artifactType`, or the short-lived
  `application/vnd.oci.artifact.manifest.v1+json` with `blobs`): whatever it
  lists, whatever the media types — model weights are just bigger layers.

Manifests go through the agent's `ManifestService`, so every one is verified
against its digest, cached in the store and remembered as the origin of the
blobs it names (clients pulling later without `?ns=` find the registry).
"""

from __future__ import annotations

import json
import platform as host
from dataclasses import dataclass, field
from typing import Any

from fleetp2p.admin.errors import BadRequest, InvalidContent, NotFound
from fleetp2p.errors import FleetError, UpstreamError
from fleetp2p.fetch import Manifest, ManifestService
from fleetp2p.oci.reference import Digest, ImageRef

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_ARTIFACT = "application/vnd.oci.artifact.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
# Registries answer 404 when none of the listed types fits, so list every one we can walk.
ACCEPT = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST, OCI_ARTIFACT]
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
# Layers that by definition are not in the registry (Windows base layers): never fetched.
_NOT_DISTRIBUTABLE = ("foreign", "nondistributable")
MAX_DEPTH = 4

_ARCH_ALIASES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
                 "armv7l": "arm", "armv6l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
                 "riscv64": "riscv64", "i686": "386", "i386": "386"}


@dataclass(frozen=True)
class Platform:
    """`os/architecture[/variant]`, as `--platform` takes it and indexes describe it."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise BadRequest(f"invalid platform {text!r}: expected os/arch[/variant], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def from_descriptor(cls, descriptor: dict[str, Any]) -> "Platform | None":
        p = descriptor.get("platform")
        if not isinstance(p, dict) or not p.get("os") or not p.get("architecture"):
            return None
        return cls(str(p["os"]).lower(), str(p["architecture"]).lower(),
                   str(p["variant"]).lower() if p.get("variant") else None)

    def matches(self, candidate: "Platform") -> bool:
        """A request without a variant takes any variant (linux/arm64 matches linux/arm64/v8)."""
        if (self.os, self.architecture) != (candidate.os, candidate.architecture):
            return False
        return self.variant is None or self.variant == (candidate.variant or _default_variant(candidate))

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def _default_variant(p: Platform) -> str | None:
    return "v8" if p.architecture == "arm64" else None


def host_platform() -> Platform:
    """The agent's own platform: what `docker pull` would pick on this machine."""
    machine = host.machine().lower()
    return Platform(host.system().lower() or "linux", _ARCH_ALIASES.get(machine, machine))


@dataclass(frozen=True)
class BlobRef:
    digest: Digest
    size: int
    media_type: str
    kind: str  # config, layer or blob (artifact manifest)
    platform: str | None

    def to_json(self) -> dict[str, Any]:
        return {"digest": str(self.digest), "size": self.size, "media_type": self.media_type,
                "kind": self.kind, "platform": self.platform}


@dataclass
class Resolved:
    """Everything a reference needs on a node: manifests first, then blobs."""

    ref: ImageRef
    digest: Digest
    media_type: str
    artifact_type: str | None = None
    manifests: list[Digest] = field(default_factory=list)
    blobs: list[BlobRef] = field(default_factory=list)
    platforms: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # non-distributable layers

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self.blobs)

    def digests(self) -> list[Digest]:
        return [*self.manifests, *(b.digest for b in self.blobs)]

    def to_json(self) -> dict[str, Any]:
        return {"ref": str(self.ref), "digest": str(self.digest), "media_type": self.media_type,
                "artifact_type": self.artifact_type, "platforms": self.platforms,
                "manifests": [str(d) for d in self.manifests],
                "blobs": [b.to_json() for b in self.blobs], "total_bytes": self.total_bytes,
                "skipped": self.skipped}


async def resolve(manifests: ManifestService, ref: ImageRef, platforms: list[Platform] | None = None,
                  all_platforms: bool = False) -> Resolved:
    """Resolve `ref` and collect its manifests and blobs, without fetching blobs.

    `platforms` (default: the host's) selects from indexes; `all_platforms`
    takes every child, attestations and other unplatformed entries included.
    """
    walker = _Walker(manifests, ref, platforms or [host_platform()], all_platforms)
    top = await walker.fetch(ref.reference, None)
    doc = _parse(top, str(ref))
    result = Resolved(ref, top.digest, top.media_type, _artifact_type(doc))
    walker.result = result
    await walker.walk(top, doc, None, 0)
    return result


class _Walker:
    def __init__(self, manifests: ManifestService, ref: ImageRef, wanted: list[Platform],
                 all_platforms: bool) -> None:
        self.manifests = manifests
        self.ref = ref
        self.wanted = wanted
        self.all_platforms = all_platforms
        self.result: Resolved | None = None
        self._seen_blobs: set[Digest] = set()

    async def fetch(self, reference: str, media_type: str | None) -> Manifest:
        accept = ([media_type] if media_type else []) + [t for t in ACCEPT if t != media_type]
        where = f"{self.ref.registry}/{self.ref.repository}"
        try:
            return await self.manifests.get(self.ref.registry, self.ref.repository, reference, accept)
        except UpstreamError as e:
            if e.status == 404:
                what = str(self.ref) if reference == self.ref.reference else f"{where}@{reference}"
                raise NotFound(f"{what}: not found in the registry (unknown tag, digest or "
                               "repository)") from e
            if e.status in (401, 403):
                raise NotFound(f"{where}: the registry refused access ({e.status}); check the "
                               "agent's credentials for it") from e
            raise

    async def walk(self, manifest: Manifest, doc: dict[str, Any], platform: str | None,
                   depth: int) -> None:
        assert self.result is not None
        if depth > MAX_DEPTH:
            raise InvalidContent(f"{self.ref}: indexes nested deeper than {MAX_DEPTH}")
        if manifest.digest not in self.result.manifests:
            self.result.manifests.append(manifest.digest)
        if _is_index(manifest, doc):
            for descriptor, child_platform in self._select(doc):
                digest, size, media_type = _descriptor(descriptor, str(self.ref))
                child = await self.fetch(str(digest), media_type)
                if len(child.content) != size:
                    raise InvalidContent(f"{self.ref}: manifest {digest} has {len(child.content)} "
                                         f"bytes, its index says {size}")
                if child_platform and child_platform not in self.result.platforms:
                    self.result.platforms.append(child_platform)
                await self.walk(child, _parse(child, f"{self.ref}@{digest}"), child_platform,
                                depth + 1)
            return
        if manifest.media_type not in (OCI_MANIFEST, DOCKER_MANIFEST, OCI_ARTIFACT) and \
                not isinstance(doc.get("layers"), list) and not isinstance(doc.get("blobs"), list):
            raise InvalidContent(f"{self.ref}: unsupported manifest type {manifest.media_type!r}")
        if isinstance(doc.get("config"), dict):
            self._add(doc["config"], "config", platform)
        for key, kind in (("layers", "layer"), ("blobs", "blob")):
            entries = doc.get(key)
            if isinstance(entries, list):
                for descriptor in entries:
                    self._add(descriptor, kind, platform)

    def _select(self, index: dict[str, Any]) -> list[tuple[dict[str, Any], str | None]]:
        children = [d for d in index.get("manifests") or [] if isinstance(d, dict)]
        described = [(d, Platform.from_descriptor(d)) for d in children]
        if self.all_platforms or not any(p for _, p in described):
            # Not a multi-platform index (e.g. a bundle of artifacts): everything belongs to it.
            return [(d, str(p) if p else None) for d, p in described]
        chosen: list[tuple[dict[str, Any], str | None]] = []
        for want in self.wanted:
            match = next(((d, p) for d, p in described if p is not None and want.matches(p)), None)
            if match is None:
                available = sorted({str(p) for _, p in described if p and p.os != "unknown"})
                raise NotFound(f"{self.ref}: no manifest for platform {want} (available: "
                               f"{', '.join(available) or 'none'}; --all-platforms takes every one)")
            if all(match[0] is not c for c, _ in chosen):
                chosen.append((match[0], str(match[1])))
        return chosen

    def _add(self, descriptor: Any, kind: str, platform: str | None) -> None:
        assert self.result is not None
        digest, size, media_type = _descriptor(descriptor, str(self.ref))
        if any(marker in media_type for marker in _NOT_DISTRIBUTABLE):
            self.result.skipped.append(str(digest))
            return
        if digest in self._seen_blobs:
            return
        self._seen_blobs.add(digest)
        self.result.blobs.append(BlobRef(digest, size, media_type, kind, platform))


def _parse(manifest: Manifest, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(manifest.content)
    except ValueError:
        raise InvalidContent(f"{where}: manifest is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidContent(f"{where}: manifest is not a JSON object")
    if doc.get("schemaVersion") == 1:
        raise InvalidContent(f"{where}: Docker schema 1 manifests are not supported")
    return doc


def _is_index(manifest: Manifest, doc: dict[str, Any]) -> bool:
    if manifest.media_type in INDEX_TYPES or doc.get("mediaType") in INDEX_TYPES:
        return True
    return isinstance(doc.get("manifests"), list) and "layers" not in doc


def _artifact_type(doc: dict[str, Any]) -> str | None:
    value = doc.get("artifactType")
    if isinstance(value, str):
        return value
    config = doc.get("config")
    # OCI 1.1 artifacts written before artifactType existed put their type in the config.
    if isinstance(config, dict) and isinstance(config.get("mediaType"), str) and \
            not config["mediaType"].startswith(("application/vnd.oci.image.config",
                                                "application/vnd.docker.container.image",
                                                "application/vnd.oci.empty")):
        return config["mediaType"]
    return None


def _descriptor(descriptor: Any, where: str) -> tuple[Digest, int, str]:
    if not isinstance(descriptor, dict):
        raise InvalidContent(f"{where}: manifest has a descriptor that is not an object")
    try:
        digest = Digest.parse(str(descriptor.get("digest")))
    except FleetError:
        raise InvalidContent(f"{where}: manifest names an invalid or unsupported digest "
                             f"{descriptor.get('digest')!r}") from None
    size = descriptor.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidContent(f"{where}: descriptor of {digest} has no valid size")
    media_type = descriptor.get("mediaType")
    return digest, size, media_type if isinstance(media_type, str) else "application/octet-stream"
