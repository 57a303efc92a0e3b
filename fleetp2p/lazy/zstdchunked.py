"""zstd:chunked: a zstd layer whose files are separate frames, with a TOC in skippable frames.

Layout (containers/storage pkg/chunked, the reference; there is no other spec):

    [zstd frames: tar headers, and each file chunk in frames of its own]
    [skippable frame: the zstd-compressed TOC JSON ("manifest")]
    [skippable frame: the zstd-compressed tar-split]        (newer writers)
    [skippable frame: the footer]

A skippable frame is magic 50 2A 4D 18, a little-endian u32 length, then the
data.  Footer data, all little-endian u64:

    40 bytes (until c/storage 1.46, skopeo 1.9, ctr-remote): manifest offset,
        compressed length, uncompressed length, manifest type (1), magic "GnUlInUx"
    56 bytes (c/storage 1.47-1.49): the same 40 bytes, then 16 zero bytes
    64 bytes (since): the four fields, tar-split offset, compressed and
        uncompressed length, magic "GNUlInUx"

so the blob ends in 48, 64 or 72 bytes of footer frame.  The manifest offset
points past the 8-byte frame header.  The same position is in the layer
annotation `…zstd-chunked.manifest-position` ("offset:length:uncompressed:type"),
and `…zstd-chunked.manifest-checksum` is the sha256 of the *compressed*
manifest bytes; both exist in an `io.github.containers.` dialect and the older
`io.containers.` one.

TOC entries: a regular file's `offset`/`endOffset` bound its payload frames;
when the file is split, the `reg` entry is its first chunk and `chunk` entries
follow, chunk i spanning [offset_i, offset_{i+1}) and the last one ending at
the file's `endOffset`.  `chunkDigest` is the sha256 of a chunk's
uncompressed bytes (holes included), `digest` that of the whole file; a file
stored as one piece has only `digest`.  `chunkType: "zeros"` marks a hole.
ctr-remote writes eStargz-style TOC JSON into the same container (no
`endOffset`, chunk ends implied by the next offset); `estargz.build_toc` reads both.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Mapping

from fleetp2p.lazy.estargz import build_toc, load_json
from fleetp2p.lazy.toc import (
    MAX_TOC_SIZE,
    TOC,
    LayerFormat,
    LazyFormatError,
    TocLocation,
    check_digest,
    inflate,
)

SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
FRAME_HEADER_SIZE = 8
MAGIC_V1 = b"GnUlInUx"
MAGIC_V2 = b"GNUlInUx"
MANIFEST_TYPE_CRFS = 1
FOOTER_FETCH_SIZE = FRAME_HEADER_SIZE + 64

CHECKSUM_ANNOTATIONS = ("io.github.containers.zstd-chunked.manifest-checksum",
                        "io.containers.zstd-chunked.manifest-checksum")
POSITION_ANNOTATIONS = ("io.github.containers.zstd-chunked.manifest-position",
                        "io.containers.zstd-chunked.manifest-position")
TARSPLIT_POSITION_ANNOTATION = "io.github.containers.zstd-chunked.tarsplit-position"

_POSITION_RE = re.compile(r"^([0-9]{1,19}):([0-9]{1,19}):([0-9]{1,19}):([0-9]{1,19})$")
_TARSPLIT_RE = re.compile(r"^([0-9]{1,19}):([0-9]{1,19}):([0-9]{1,19})$")


def parse_footer(tail: bytes, blob_size: int) -> TocLocation:
    """Find the TOC from the last bytes of the blob (pass at least FOOTER_FETCH_SIZE)."""
    if len(tail) > blob_size:
        raise LazyFormatError("footer tail is longer than the blob")
    for data_len in (64, 56, 40):
        frame = tail[-(FRAME_HEADER_SIZE + data_len):]
        if len(frame) != FRAME_HEADER_SIZE + data_len or frame[:4] != SKIPPABLE_MAGIC:
            continue
        if struct.unpack_from("<I", frame, 4)[0] != data_len:
            continue
        data = frame[FRAME_HEADER_SIZE:]
        offset, length, ulength, mtype = struct.unpack_from("<4Q", data)
        tar_split = None
        if data_len == 64:
            if data[56:] != MAGIC_V2:
                raise LazyFormatError("zstd:chunked footer has a bad magic number")
            ts = struct.unpack_from("<3Q", data, 32)
            tar_split = ts if ts[0] else None
        elif data[32:40] != MAGIC_V1 or data[40:] != bytes(data_len - 40):
            raise LazyFormatError("zstd:chunked footer has a bad magic number")
        footer_size = FRAME_HEADER_SIZE + data_len
        loc = _location(offset, length, ulength, mtype, tar_split, footer_size)
        if loc.offset + (loc.length or 0) > blob_size - footer_size:
            raise LazyFormatError("zstd:chunked TOC extends past the footer")
        if tar_split and tar_split[0] + tar_split[1] > blob_size - footer_size:
            raise LazyFormatError("zstd:chunked tar-split extends past the footer")
        return loc
    raise LazyFormatError("no zstd:chunked footer frame at the end of the blob")


def _location(offset: int, length: int, ulength: int, mtype: int,
              tar_split: tuple[int, int, int] | None, footer_size: int) -> TocLocation:
    if mtype != MANIFEST_TYPE_CRFS:
        raise LazyFormatError(f"unsupported zstd:chunked manifest type {mtype}")
    if offset < FRAME_HEADER_SIZE or length == 0 or ulength == 0:
        raise LazyFormatError("zstd:chunked manifest position is empty or out of range")
    if length > MAX_TOC_SIZE or ulength > MAX_TOC_SIZE:
        raise LazyFormatError("zstd:chunked TOC is larger than the supported maximum")
    return TocLocation(offset=offset, length=length, uncompressed_length=ulength,
                       payload_end=offset - FRAME_HEADER_SIZE, footer_size=footer_size,
                       tar_split=tar_split)


def _annotation(annotations: Mapping[str, str], keys: tuple[str, ...]) -> str | None:
    """The value under the new or the old key; both present must agree."""
    values = {annotations[k] for k in keys if k in annotations}
    if len(values) > 1:
        raise LazyFormatError(f"conflicting {keys[0]} annotations")
    return values.pop() if values else None


def checksum_from_annotations(annotations: Mapping[str, str]) -> str | None:
    """The manifest checksum (sha256 of the compressed TOC), in either dialect."""
    return _annotation(annotations, CHECKSUM_ANNOTATIONS)


def location_from_annotations(annotations: Mapping[str, str]) -> TocLocation | None:
    """The TOC position from the layer annotations, saving the footer round trip."""
    value = _annotation(annotations, POSITION_ANNOTATIONS)
    if value is None:
        return None
    m = _POSITION_RE.fullmatch(value)
    if not m:
        raise LazyFormatError(f"malformed zstd:chunked manifest position {value!r}")
    offset, length, ulength, mtype = (int(g) for g in m.groups())
    tar_split = None
    if TARSPLIT_POSITION_ANNOTATION in annotations:
        ts = _TARSPLIT_RE.fullmatch(annotations[TARSPLIT_POSITION_ANNOTATION])
        if not ts:
            raise LazyFormatError("malformed zstd:chunked tar-split position")
        tar_split = (int(ts[1]), int(ts[2]), int(ts[3]))
    return _location(offset, length, ulength, mtype, tar_split, 0)


def parse_toc(manifest: bytes, expected_toc_digest: str | None,
              location: TocLocation | None = None, *,
              expected_json_digest: str | None = None) -> TOC:
    """Parse the compressed manifest (blob bytes [location.offset, location.end)) into a `TOC`.

    `expected_toc_digest` is the manifest-checksum annotation (over the
    compressed bytes).  `expected_json_digest` is the stargz toc.digest that
    ctr-remote also attaches (over the uncompressed JSON).  `location` gives
    the exact length and the end of the file data.
    """
    if location is not None and location.length is not None:
        if len(manifest) < location.length:
            raise LazyFormatError("zstd:chunked TOC is truncated")
        manifest = manifest[:location.length]
    if len(manifest) > MAX_TOC_SIZE:
        raise LazyFormatError("zstd:chunked TOC is larger than the supported maximum")
    if expected_toc_digest is not None:
        check_digest(manifest, expected_toc_digest, "zstd:chunked TOC")
    want = location.uncompressed_length if location and location.uncompressed_length else None
    data = inflate(LayerFormat.ZSTD_CHUNKED, manifest, (want or MAX_TOC_SIZE) + 1)
    if (want is not None and len(data) != want) or len(data) > MAX_TOC_SIZE:
        raise LazyFormatError(f"zstd:chunked TOC inflated to {len(data)} bytes, expected {want}")
    if expected_json_digest is not None:
        check_digest(data, expected_json_digest, "zstd:chunked TOC JSON")
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    payload_end = None if location is None else location.payload_end
    return build_toc(LayerFormat.ZSTD_CHUNKED, load_json(data), digest, payload_end)
