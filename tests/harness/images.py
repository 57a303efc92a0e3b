"""OCI image layouts built from Python, pushed to a test registry.

Layers are random (incompressible, so gzip'd size ≈ chosen size, and every layer is
unique so dedup never hides a byte count) and streamed to disk while hashing:
a 1 GiB model layer costs 1 MiB of memory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .process import run
from .regclient import OCI_INDEX, OCI_MANIFEST, RegistryClient

LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
EMPTY_JSON = "application/vnd.oci.empty.v1+json"
MODEL_ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
MODEL_WEIGHTS = "application/vnd.cncf.model.weight.v1.raw"
REF_NAME = "org.opencontainers.image.ref.name"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Blob:
    """A content-addressed file in the layout, with the descriptor that names it."""

    digest: str
    size: int
    media_type: str
    path: Path

    def descriptor(self, **extra: object) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass
class Image:
    """One platform image: manifest → config + layers."""

    manifest: Blob
    config: Blob
    layers: list[Blob]
    platform: str = "linux/amd64"

    @property
    def blobs(self) -> list[Blob]:
        return [self.config, *self.layers]

    @property
    def blob_bytes(self) -> int:
        return sum(b.size for b in self.blobs)


@dataclass
class Layout:
    """An OCI image layout on disk plus what a test needs to assert about it.

    `top` is what the tag points at: an image manifest, an index, or an artifact manifest.
    """

    root: Path
    tag: str
    top: Blob
    images: dict[str, Image] = field(default_factory=dict)

    @property
    def is_index(self) -> bool:
        return self.top.media_type == OCI_INDEX

    @property
    def image(self) -> Image:
        """The single image of a non-index layout."""
        assert len(self.images) == 1, "layout has several platform images"
        return next(iter(self.images.values()))

    def all_blobs(self) -> list[Blob]:
        """Every blob below `top` (configs and layers), deduplicated."""
        seen: dict[str, Blob] = {}
        for img in self.images.values():
            for b in img.blobs:
                seen[b.digest] = b
        return list(seen.values())


class _HashingWriter:
    """File-like sink that hashes and counts what passes through to `inner`."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.inner.write(data)
        return len(data)

    def flush(self) -> None:
        self.inner.flush()


class _RandomReader:
    """Readable stream of `size` pseudo-random bytes (fast, not cryptographic)."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.left = size
        self.rng = rng

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n) if n else b""


class LayoutWriter:
    """Writes blobs into `root/blobs/sha256/` and finally `index.json` + `oci-layout`."""

    def __init__(self, root: Path, seed: int | None = None) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(8), "big"))

    def _commit(self, tmp: Path, sha: "hashlib._Hash", size: int, media_type: str) -> Blob:
        digest = sha.hexdigest()
        final = self.blob_dir / digest
        os.replace(tmp, final)
        return Blob(f"sha256:{digest}", size, media_type, final)

    def add_bytes(self, data: bytes, media_type: str) -> Blob:
        tmp = self.blob_dir / f".tmp-{os.getpid()}-{self.rng.getrandbits(32)}"
        tmp.write_bytes(data)
        return self._commit(tmp, hashlib.sha256(data), len(data), media_type)

    def add_json(self, obj: dict, media_type: str) -> Blob:
        return self.add_bytes(json.dumps(obj, separators=(",", ":")).encode(), media_type)

    def add_random_raw(self, size: int, media_type: str) -> Blob:
        """An uncompressed blob of random bytes (model weights), streamed to disk."""
        tmp = self.blob_dir / f".tmp-{os.getpid()}-{self.rng.getrandbits(32)}"
        with open(tmp, "wb") as f:
            sink = _HashingWriter(f)
            src = _RandomReader(size, self.rng)
            while chunk := src.read(CHUNK):
                sink.write(chunk)
        return self._commit(tmp, sink.sha, sink.size, media_type)

    def add_random_layer(self, size: int) -> tuple[Blob, str]:
        """A gzip'd tar holding one random file of `size` bytes; returns (blob, diff_id)."""
        tmp = self.blob_dir / f".tmp-{os.getpid()}-{self.rng.getrandbits(32)}"
        with open(tmp, "wb") as f:
            compressed = _HashingWriter(f)
            # mtime=0 and level 1: reproducible header, and random data won't shrink anyway.
            with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=1, mtime=0) as gz:  # type: ignore[arg-type]
                uncompressed = _HashingWriter(gz)  # type: ignore[arg-type]
                with tarfile.open(fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                    info = tarfile.TarInfo(f"data/{self.rng.getrandbits(64):016x}.bin")
                    info.size = size
                    info.mode = 0o644
                    tar.addfile(info, _RandomReader(size, self.rng))  # type: ignore[arg-type]
        blob = self._commit(tmp, compressed.sha, compressed.size, LAYER_TAR_GZIP)
        return blob, f"sha256:{uncompressed.sha.hexdigest()}"

    def add_image(self, layer_sizes: list[int], platform: str = "linux/amd64") -> Image:
        os_name, _, arch = platform.partition("/")
        layers, diff_ids = [], []
        for size in layer_sizes:
            blob, diff_id = self.add_random_layer(size)
            layers.append(blob)
            diff_ids.append(diff_id)
        config = self.add_json({"architecture": arch, "os": os_name,
                                "config": {"Cmd": ["/data"]},
                                "rootfs": {"type": "layers", "diff_ids": diff_ids}}, IMAGE_CONFIG)
        manifest = self.add_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                  "config": config.descriptor(),
                                  "layers": [b.descriptor() for b in layers]}, OCI_MANIFEST)
        return Image(manifest, config, layers, platform)

    def write_index(self, top: Blob, tag: str) -> None:
        (self.root / "index.json").write_text(json.dumps({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [top.descriptor(annotations={REF_NAME: tag})]}))


def _platform(p: str) -> dict:
    os_name, _, arch = p.partition("/")
    return {"architecture": arch, "os": os_name}


def build_image(root: Path, layer_sizes: list[int], tag: str = "v1", platform: str = "linux/amd64",
                seed: int | None = None) -> Layout:
    """A single-platform image with one random gzip'd tar layer per size."""
    w = LayoutWriter(root, seed)
    img = w.add_image(layer_sizes, platform)
    w.write_index(img.manifest, tag)
    return Layout(root, tag, img.manifest, {platform: img})


def build_multiplatform(root: Path, layer_sizes: list[int], tag: str = "multi",
                        platforms: tuple[str, ...] = ("linux/amd64", "linux/arm64"),
                        seed: int | None = None) -> Layout:
    """An image index with one image per platform, no layers shared between them."""
    w = LayoutWriter(root, seed)
    images = {p: w.add_image(layer_sizes, p) for p in platforms}
    index = w.add_json({"schemaVersion": 2, "mediaType": OCI_INDEX,
                        "manifests": [img.manifest.descriptor(platform=_platform(p))
                                      for p, img in images.items()]}, OCI_INDEX)
    w.write_index(index, tag)
    return Layout(root, tag, index, images)


def build_model_artifact(root: Path, weights_size: int, tag: str = "model",
                         extra_files: dict[str, int] | None = None, seed: int | None = None) -> Layout:
    """An OCI 1.1 artifact: `artifactType`, empty config, one big raw weights layer
    (custom media type, uncompressed) plus optional small side files."""
    w = LayoutWriter(root, seed)
    config = w.add_bytes(b"{}", EMPTY_JSON)
    weights = w.add_random_raw(weights_size, MODEL_WEIGHTS)
    layers = [weights]
    descriptors = [weights.descriptor(annotations={"org.opencontainers.image.title": "model.safetensors"})]
    for name, size in (extra_files or {}).items():
        blob = w.add_random_raw(size, "application/vnd.cncf.model.file.v1.raw")
        layers.append(blob)
        descriptors.append(blob.descriptor(annotations={"org.opencontainers.image.title": name}))
    manifest = w.add_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "artifactType": MODEL_ARTIFACT_TYPE,
                           "config": config.descriptor(), "layers": descriptors,
                           "annotations": {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"}},
                          OCI_MANIFEST)
    w.write_index(manifest, tag)
    return Layout(root, tag, manifest, {"artifact": Image(manifest, config, layers, "artifact")})


# Pushing ---------------------------------------------------------------------

@dataclass(frozen=True)
class Pushed:
    """A layout as it now exists in a registry: what tests pull and assert against."""

    registry_host: str
    repo: str
    tag: str
    layout: Layout

    @property
    def ref(self) -> str:
        return f"{self.registry_host}/{self.repo}:{self.tag}"

    @property
    def digest(self) -> str:
        return self.layout.top.digest

    @property
    def digest_ref(self) -> str:
        return f"{self.registry_host}/{self.repo}@{self.digest}"


def skopeo_push(layout: Layout, registry_host: str, repo: str, tag: str | None = None,
                creds: tuple[str, str] | None = None) -> Pushed:
    """`skopeo copy oci:DIR:TAG docker://…` keeping digests (fails loudly if it can't)."""
    tag = tag or layout.tag
    argv = ["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"]
    if layout.is_index:
        argv.append("--all")
    if creds is not None:
        argv += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
    argv += [f"oci:{layout.root}:{layout.tag}", f"docker://{registry_host}/{repo}:{tag}"]
    run(argv, timeout=300)
    return Pushed(registry_host, repo, tag, layout)


def http_push(layout: Layout, client: RegistryClient, registry_host: str, repo: str,
              tag: str | None = None) -> Pushed:
    """Push blobs then manifests over the distribution API (what artifact tools do)."""
    tag = tag or layout.tag
    for blob in layout.all_blobs():
        client.push_blob(repo, blob.digest, blob.path)
    for img in layout.images.values():
        if img.manifest.digest != layout.top.digest:
            client.put_manifest(repo, img.manifest.digest, img.manifest.path.read_bytes(),
                                img.manifest.media_type)
    client.put_manifest(repo, tag, layout.top.path.read_bytes(), layout.top.media_type)
    return Pushed(registry_host, repo, tag, layout)
