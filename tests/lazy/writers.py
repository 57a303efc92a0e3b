"""Test-only writers: plain tar layers, OCI layouts, and small eStargz / zstd:chunked blobs.

The real tools (skopeo, ctr-remote) produce the layers the readers are proven
against; these writers cover what those tools here cannot: a prefetch landmark
without running a container, shared gzip streams (`innerOffset`), the legacy
47-byte stargz footer, and the newer 72-byte zstd:chunked footer with the
`io.github.containers` annotations.  They follow the same specs as the
readers, so they are no substitute for the real-tool fixtures.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import zstandard

MTIME = 1_700_000_000


@dataclass(frozen=True)
class Item:
    """One tar entry: type is 'dir', 'reg', 'symlink' or 'hardlink'."""

    name: str
    type: str = "reg"
    data: bytes = b""
    link: str = ""


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


_KINDS = {"dir": tarfile.DIRTYPE, "reg": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE,
          "hardlink": tarfile.LNKTYPE}


def _header(item: Item) -> bytes:
    """The tar header block(s) of one item, as a tar writer would emit them."""
    info = tarfile.TarInfo(item.name)
    info.type, info.mtime, info.linkname = _KINDS[item.type], MTIME, item.link
    info.mode = 0o755 if item.type == "dir" else 0o644
    info.size = len(item.data) if item.type == "reg" else 0
    return info.tobuf(tarfile.PAX_FORMAT)


def _pad(n: int) -> bytes:
    return bytes(-n % 512)


def build_tar(items: list[Item]) -> bytes:
    """An uncompressed tar (PAX headers) of the items."""
    out = bytearray()
    for item in items:
        out += _header(item) + item.data + _pad(len(item.data))
    return bytes(out + bytes(1024))


def write_oci_layout(root: Path, tag: str, layer: bytes, media_type: str, diff_id: str) -> None:
    """A one-layer linux/amd64 image in an OCI image layout directory."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> dict:
        digest = sha256(data)
        (blobs / digest[7:]).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(config)},
        "layers": [{"mediaType": media_type, **put(layer)}],
    }).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **put(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


def _entry(item: Item) -> dict:
    """The item's TOC entry, without offsets or chunk fields."""
    out: dict = {"name": item.name, "type": item.type, "mode": 0o755 if item.type == "dir" else 0o644}
    if item.link:
        out["linkName"] = item.link
    if item.type == "reg":
        out["size"] = len(item.data)
        out["digest"] = sha256(item.data)
    return out


class _GzipStreams:
    """Output made of gzip members; a member is closed whenever a new stream must start."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.z: zlib._Compress | None = None
        self.start = 0
        self.written = 0  # uncompressed bytes in the open member

    def write(self, data: bytes) -> None:
        if self.z is None:
            self.z, self.start, self.written = zlib.compressobj(9, zlib.DEFLATED, 31), len(self.out), 0
        self.out += self.z.compress(data)
        self.written += len(data)

    def compressed_since_start(self) -> int:
        if self.z is None:
            return 0
        self.out += self.z.flush(zlib.Z_SYNC_FLUSH)
        return len(self.out) - self.start

    def close(self) -> None:
        if self.z is not None:
            self.out += self.z.flush()
            self.z = None


def write_estargz(items: list[Item], *, chunk_size: int = 1 << 20, prioritized: tuple[str, ...] = (),
                  min_chunk_size: int = 0, legacy_footer: bool = False) -> tuple[bytes, str]:
    """An eStargz blob and its TOC JSON digest.

    With `prioritized`, those files come first, followed by `.prefetch.landmark`.
    With `min_chunk_size`, a chunk goes into the open gzip member (recorded
    with `innerOffset`) until that member has that many compressed bytes, as
    `ctr-remote --estargz-min-chunk-size` does.
    """
    if prioritized:
        first = [i for i in items if i.name in prioritized]
        items = first + [Item(".prefetch.landmark", data=b"\x0f")] + [i for i in items if i not in first]
    g = _GzipStreams()
    entries: list[dict] = []
    for item in items:
        g.write(_header(item))
        entry = _entry(item)
        entries.append(entry)
        for pos in range(0, len(item.data), chunk_size):
            piece = item.data[pos:pos + chunk_size]
            landmark = item.name == ".prefetch.landmark"
            if min_chunk_size and not landmark and 0 < g.compressed_since_start() < min_chunk_size:
                offset, inner = g.start, g.written
            else:
                g.close()
                offset, inner = len(g.out), 0
            rec = entry if pos == 0 else {"name": item.name, "type": "chunk"}
            rec.update(offset=offset, chunkOffset=pos, chunkDigest=sha256(piece))
            if inner:
                rec["innerOffset"] = inner
            if pos + chunk_size < len(item.data):
                rec["chunkSize"] = len(piece)
            if pos:
                entries.append(rec)
            g.write(piece)
        g.write(_pad(len(item.data)))
    g.close()
    toc_offset = len(g.out)
    toc = json.dumps({"version": 1, "entries": entries}, indent="\t").encode()
    info = tarfile.TarInfo("stargz.index.json")
    info.size = len(toc)
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(toc))
    g.write(tar_buf.getvalue())
    g.close()
    return bytes(g.out) + estargz_footer(toc_offset, legacy=legacy_footer), sha256(toc)


def estargz_footer(toc_offset: int, *, legacy: bool = False) -> bytes:
    """The 51-byte eStargz footer (47-byte stargz one if legacy): an empty gzip member."""
    payload = b"%016xSTARGZ" % toc_offset
    extra = payload if legacy else b"SG" + struct.pack("<H", len(payload)) + payload
    header = b"\x1f\x8b\x08\x04" + bytes(5) + b"\xff" + struct.pack("<H", len(extra)) + extra
    return header + b"\x01\x00\x00\xff\xff" + bytes(8)


def write_zstd_chunked(items: list[Item], *, chunk_size: int = 64 << 10, footer: str = "v2",
                       dialect: str = "io.github.containers") -> tuple[bytes, dict[str, str]]:
    """A zstd:chunked blob as containers/storage writes it, and its layer annotations.

    Files are cut into `chunk_size` pieces, each its own frame; an all-zero
    piece becomes a "zeros" chunk.  `footer` is "v2" (72 bytes) or "v1" (48).
    """
    cctx = zstandard.ZstdCompressor(level=3)
    out = bytearray()
    pending = bytearray()  # tar headers/padding waiting for the next frame

    def flush() -> None:
        if pending:
            out.extend(cctx.compress(bytes(pending)))
            pending.clear()

    entries: list[dict] = []
    for item in items:
        pending += _header(item)
        entry = _entry(item)
        entries.append(entry)
        if not item.data:
            continue
        flush()
        chunks = []
        for pos in range(0, len(item.data), chunk_size):
            piece = item.data[pos:pos + chunk_size]
            chunks.append({"offset": len(out), "chunkOffset": pos, "chunkSize": len(piece),
                           "chunkDigest": sha256(piece), **({"chunkType": "zeros"} if not any(piece) else {})})
            out.extend(cctx.compress(piece))
        entry.update(offset=chunks[0]["offset"], endOffset=len(out))
        if len(chunks) > 1:
            entry.update({k: v for k, v in chunks[0].items() if k not in ("offset", "chunkOffset")})
            entries.extend({"type": "chunk", "name": item.name, **c} for c in chunks[1:])
        pending += _pad(len(item.data))
    pending += bytes(1024)
    flush()
    manifest = json.dumps({"version": 1, "entries": entries}).encode()
    compressed = cctx.compress(manifest)
    offset = len(out) + 8
    out += _skippable(compressed)
    tar_split = cctx.compress(b'{"type":1}\n')
    ts_offset = len(out) + 8
    out += _skippable(tar_split)
    fields = struct.pack("<4Q", offset, len(compressed), len(manifest), 1)
    if footer == "v2":
        fields += struct.pack("<3Q", ts_offset, len(tar_split), 11) + b"GNUlInUx"
    else:
        fields += b"GnUlInUx"
    out += _skippable(fields)
    annotations = {
        f"{dialect}.zstd-chunked.manifest-checksum": sha256(compressed),
        f"{dialect}.zstd-chunked.manifest-position": f"{offset}:{len(compressed)}:{len(manifest)}:1",
    }
    if dialect == "io.github.containers":
        annotations[f"{dialect}.zstd-chunked.tarsplit-position"] = f"{ts_offset}:{len(tar_split)}:11"
    return bytes(out), annotations


def _skippable(data: bytes) -> bytes:
    return b"\x50\x2a\x4d\x18" + struct.pack("<I", len(data)) + data


def gzip_member(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


@dataclass(frozen=True)
class RealLayer:
    """A layer blob with the descriptor fields a manifest gave for it."""

    media_type: str
    annotations: dict[str, str]
    blob: bytes

    @property
    def size(self) -> int:
        return len(self.blob)

    def read(self, start: int, end: int) -> bytes:
        return self.blob[start:end]


def load_layer(layout: Path, ref_name: str) -> RealLayer:
    """The first layer of the image tagged `ref_name` in an OCI layout directory."""
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref_name:
            manifest = json.loads((blobs / desc["digest"][7:]).read_text())
            layer = manifest["layers"][0]
            blob = (blobs / layer["digest"][7:]).read_bytes()
            assert sha256(blob) == layer["digest"] and len(blob) == layer["size"]
            return RealLayer(layer["mediaType"], layer.get("annotations", {}), blob)
    raise AssertionError(f"no image {ref_name!r} in {layout}")
