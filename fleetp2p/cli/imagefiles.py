"""Reading an image's files through the local agent, as an OCI client of it.

`ls` needs only the TOCs of lazy layers; `get` fetches only the chunks of one
file and checks each against its digest before writing it. Plain gzip layers
have no TOC: `get` then streams the whole layer through the agent (saying so)
and extracts the file from the tar stream.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import platform
import socket
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from fleetp2p.cli.agentclient import AgentUnreachable, UsageError
from fleetp2p.errors import FleetError
from fleetp2p.lazy import TOC, Entry, LayerPlan, LazyError, decode_chunk, detect, fetch_ranges
from fleetp2p.lazy.toc import clean_name
from fleetp2p.oci.reference import ImageRef

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
ACCEPT = ", ".join(INDEX_TYPES + MANIFEST_TYPES)
WHITEOUT = ".wh."


@dataclass
class Layer:
    digest: str
    size: int
    media_type: str
    plan: LayerPlan | None
    toc: TOC | None = None


class MirrorReader:
    """GETs against the agent's /v2/ API, one keep-alive connection."""

    def __init__(self, agent: str, ref: ImageRef) -> None:
        parts = urlsplit(agent)
        if parts.scheme != "http" or not parts.hostname:
            raise UsageError(f"invalid agent URL {agent!r}: expected http://HOST:PORT")
        self.agent = agent
        self.ref = ref
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=120)
        self.fetched = 0

    def _get(self, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        url = f"/v2/{self.ref.repository}/{path}?ns={self.ref.registry}"
        try:
            self.conn.request("GET", url, headers=headers)
            return self.conn.getresponse()
        except (ConnectionRefusedError, socket.gaierror, socket.timeout, OSError) as e:
            self.conn.close()
            raise AgentUnreachable(f"cannot reach the agent at {self.agent}: {e}") from None

    def manifest(self, reference: str) -> tuple[dict[str, Any], str]:
        resp = self._get(f"manifests/{reference}", {"Accept": ACCEPT})
        body = resp.read()
        if resp.status == 404:
            raise FleetError(f"{self.ref.registry}/{self.ref.repository}:{reference}: not found "
                             "(through the agent)")
        if resp.status != 200:
            raise FleetError(f"agent answered {resp.status} for the manifest: {body[:200]!r}")
        try:
            return json.loads(body), resp.getheader("Content-Type", "")
        except ValueError:
            raise FleetError("the manifest is not JSON") from None

    def blob_range(self, digest: str, start: int, end: int) -> bytes:
        resp = self._get(f"blobs/{digest}", {"Range": f"bytes={start}-{end - 1}"})
        data = resp.read()
        if resp.status != 206 or len(data) != end - start:
            raise FleetError(f"agent answered {resp.status} for bytes {start}-{end - 1} of {digest}")
        self.fetched += len(data)
        return data

    def blob_stream(self, digest: str) -> http.client.HTTPResponse:
        resp = self._get(f"blobs/{digest}", {})
        if resp.status != 200:
            resp.read()
            raise FleetError(f"agent answered {resp.status} for layer {digest}")
        return resp


def default_platform() -> str:
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
    return f"linux/{arch}"


def image_layers(reader: MirrorReader, wanted_platform: str | None) -> list[Layer]:
    document, media_type = reader.manifest(reader.ref.reference)
    if document.get("mediaType", media_type) in INDEX_TYPES or "manifests" in document:
        target = wanted_platform or default_platform()
        for child in document.get("manifests", []):
            p = child.get("platform") or {}
            name = "/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x)
            if name == target or name.startswith(target + "/") or \
                    f"{p.get('os')}/{p.get('architecture')}" == target:
                document, _ = reader.manifest(child["digest"])
                break
        else:
            raise UsageError(f"{reader.ref} has no manifest for platform {target}")
    layers = []
    for desc in document.get("layers", []):
        try:
            plan = detect(desc.get("mediaType", ""), desc.get("annotations"), desc.get("size"))
        except LazyError:
            plan = None
        layers.append(Layer(desc["digest"], int(desc.get("size", 0)), desc.get("mediaType", ""), plan))
    return layers


def load_toc(reader: MirrorReader, layer: Layer) -> TOC:
    assert layer.plan is not None
    plan = layer.plan
    location = plan.location
    if location is None or location.end is None:
        start, end = plan.first_range(layer.size)
        location = plan.parse_footer(reader.blob_range(layer.digest, start, end), layer.size)
    if location.end is None:
        raise FleetError(f"layer {layer.digest}: footer does not locate the TOC")
    layer.toc = plan.parse_toc(reader.blob_range(layer.digest, location.offset, location.end), location)
    return layer.toc


def find(layers: list[Layer], path: str, reader: MirrorReader) -> tuple[Layer, Entry | None]:
    """The topmost layer that has `path` (its entry), or the first plain layer we
    cannot look into. A whiteout above hides the file."""
    name = clean_name(path)
    parent, _, base = name.rpartition("/")
    whiteout = f"{parent}/{WHITEOUT}{base}" if parent else f"{WHITEOUT}{base}"
    for layer in reversed(layers):
        if layer.plan is None:
            return layer, None
        toc = layer.toc or load_toc(reader, layer)
        entry = toc.lookup(name)
        if entry is not None:
            return layer, entry
        if toc.lookup(whiteout) is not None:
            break
    raise FleetError(f"{path}: no such file in the image")


def write_lazy_file(reader: MirrorReader, layer: Layer, entry: Entry, out: BinaryIO,
                    progress) -> int:
    """The file's chunks in file order, each checked against its digest before it
    is written; the whole-file digest too when the TOC has one."""
    assert layer.toc is not None
    chunks = sorted(layer.toc.chunks_for(entry.name), key=lambda c: c.file_offset)
    spans = fetch_ranges(chunks)
    fetched: dict[tuple[int, int], bytes] = {}
    whole = hashlib.sha256()
    written = 0
    for chunk in chunks:
        if chunk.zeros:
            plain = bytes(chunk.size)
        else:
            span = next(s for s in spans if s[0] <= chunk.compressed_offset < s[1])
            if span not in fetched:
                fetched.clear()  # chunks come in file order: earlier spans are done with
                fetched[span] = reader.blob_range(layer.digest, *span)
                progress(span[1] - span[0])
            data = fetched[span]
            end = chunk.compressed_end or span[1]
            plain = decode_chunk(layer.toc.format, data[chunk.compressed_offset - span[0]:end - span[0]],
                                 chunk, verify=chunk.digest is not None or not entry.digest)
        out.write(plain)
        whole.update(plain)
        written += len(plain)
    if entry.digest:
        check_digest_of(whole, entry.digest, entry.name)
    return written


def check_digest_of(hasher: "hashlib._Hash", expected: str, name: str) -> None:
    if f"sha256:{hasher.hexdigest()}" != expected:
        raise FleetError(f"{name}: assembled file does not match its digest {expected}")


def extract_from_layer(reader: MirrorReader, layer: Layer, path: str, out: BinaryIO,
                       progress) -> int | None:
    """Stream a whole plain layer through the agent and copy one member out."""
    name = clean_name(path)
    resp = reader.blob_stream(layer.digest)
    counted = _Counting(resp, progress)
    mode = "r|gz" if "gzip" in layer.media_type else "r|*"
    if "zstd" in layer.media_type:
        import zstandard
        stream: Any = zstandard.ZstdDecompressor().stream_reader(counted)
        mode = "r|"
    else:
        stream = counted
    with tarfile.open(fileobj=stream, mode=mode) as tar:
        for member in tar:
            if clean_name(member.name) == name and member.isfile():
                source = tar.extractfile(member)
                assert source is not None
                for block in iter(lambda: source.read(1 << 20), b""):
                    out.write(block)
                return member.size
    return None


class _Counting:
    def __init__(self, raw: http.client.HTTPResponse, progress) -> None:
        self.raw, self.progress = raw, progress

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.progress(len(data))
        return data


def list_entries(layers: list[Layer], reader: MirrorReader) -> Iterator[dict[str, Any]]:
    for layer in layers:
        if layer.plan is None:
            yield {"layer": layer.digest, "lazy": False, "media_type": layer.media_type}
            continue
        toc = layer.toc or load_toc(reader, layer)
        for entry in toc.entries:
            yield {"layer": layer.digest, "lazy": True, "format": toc.format.value,
                   "path": entry.name, "type": entry.type, "size": entry.size,
                   "mode": oct(entry.mode), "link": entry.link_name or None}
