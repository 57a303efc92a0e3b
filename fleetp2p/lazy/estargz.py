"""eStargz: a gzip layer whose files are separately compressed gzip members.

Layout (containerd/stargz-snapshotter docs/estargz.md):

    [gzip member(s): tar headers, file payloads, one member per chunk]
    [gzip member: a tar holding stargz.index.json (the TOC)]
    [footer: an empty gzip member whose Extra field names the TOC offset]

The footer is 51 bytes: a 10-byte gzip header with FLG=FEXTRA, XLEN=26, an
RFC 1952 subfield 'S','G' of length 22 carrying "%016xSTARGZ" (TOC offset in
hex), an empty stored deflate block (5 bytes) and a zero CRC/ISIZE trailer.
Old stargz used a 47-byte footer whose Extra field is the 22 bytes without
the subfield header.

Digests: the `containerd.io/snapshot/stargz/toc.digest` annotation is the
sha256 of the *uncompressed* TOC JSON; `chunkDigest` is the sha256 of a
chunk's uncompressed bytes; `digest` is the sha256 of the whole file.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import tarfile
import zlib

from fleetp2p.lazy.toc import (
    MAX_TOC_SIZE,
    TOC,
    LayerFormat,
    LazyFormatError,
    TocLocation,
    build_toc,
    check_digest,
    inflate,
    load_json,
)

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
EXTERNAL_TOC_FOOTER_SIZE = 46
# Fetching the largest footer from the end of the blob covers all of them.
FOOTER_FETCH_SIZE = FOOTER_SIZE

TOC_JSON_NAME = "stargz.index.json"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"

_GZIP_HEAD = b"\x1f\x8b\x08\x04"  # magic, deflate, FLG=FEXTRA only
_HEX16 = re.compile(rb"^[0-9a-fA-F]{16}$")


def parse_footer(tail: bytes, blob_size: int) -> TocLocation:
    """Find the TOC from the last bytes of the blob (pass at least FOOTER_FETCH_SIZE).

    Tries the 51-byte eStargz footer, then the 47-byte legacy stargz one.
    """
    if len(tail) > blob_size:
        raise LazyFormatError("footer tail is longer than the blob")
    if b"STARGZEXTERNALTOC" in tail[-EXTERNAL_TOC_FOOTER_SIZE:]:
        raise LazyFormatError("eStargz with an external TOC is not supported")
    errors = []
    for size, parse in ((FOOTER_SIZE, _offset_from_footer), (LEGACY_FOOTER_SIZE, _offset_from_legacy)):
        if len(tail) < size:
            errors.append(f"{size}-byte footer: only {len(tail)} bytes given")
            continue
        try:
            toc_offset = parse(tail[-size:])
        except LazyFormatError as exc:
            errors.append(f"{size}-byte footer: {exc}")
            continue
        length = blob_size - size - toc_offset
        if length <= 0:
            raise LazyFormatError(f"TOC offset {toc_offset} is past the footer of a {blob_size}-byte blob")
        return TocLocation(offset=toc_offset, length=length, payload_end=toc_offset, footer_size=size)
    raise LazyFormatError("not an eStargz footer (" + "; ".join(errors) + ")")


def _offset_from_footer(footer: bytes) -> int:
    if footer[:4] != _GZIP_HEAD:
        raise LazyFormatError("no gzip header with an Extra field")
    xlen, si, sublen = struct.unpack_from("<H2sH", footer, 10)
    if xlen != 26 or si != b"SG" or sublen != 22:
        raise LazyFormatError("Extra field is not an 'SG' subfield of 22 bytes")
    _check_empty_member(footer)
    return _hex_offset(footer[16:38])


def _offset_from_legacy(footer: bytes) -> int:
    if footer[:4] != _GZIP_HEAD or struct.unpack_from("<H", footer, 10)[0] != 22:
        raise LazyFormatError("no gzip header with a 22-byte Extra field")
    _check_empty_member(footer)
    return _hex_offset(footer[12:34])


def _hex_offset(field: bytes) -> int:
    if field[16:] != b"STARGZ" or not _HEX16.fullmatch(field[:16]):
        raise LazyFormatError("Extra field lacks the %016xSTARGZ marker")
    return int(field[:16], 16)


def _check_empty_member(footer: bytes) -> None:
    """The footer must itself be a valid, empty gzip member (it is part of the gzip stream)."""
    d = zlib.decompressobj(31)
    try:
        out = d.decompress(footer)
    except zlib.error as exc:
        raise LazyFormatError(f"footer is not a valid gzip member: {exc}") from None
    if out or not d.eof or d.unused_data:
        raise LazyFormatError("footer is not exactly one empty gzip member")


def toc_json(toc_bytes: bytes) -> bytes:
    """The raw `stargz.index.json` bytes from the TOC gzip member (the digested bytes)."""
    # The tar holds one entry: a 512-byte header, the JSON, padding and the
    # end-of-archive blocks; inflate only what that can take.
    raw = inflate(LayerFormat.ESTARGZ, toc_bytes, MAX_TOC_SIZE + 4096)
    if len(raw) > MAX_TOC_SIZE + 2048:
        raise LazyFormatError("TOC is larger than the supported maximum")
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            member = tar.next()
            if member is None or member.name != TOC_JSON_NAME or not member.isreg():
                raise LazyFormatError(f"first TOC tar entry is not {TOC_JSON_NAME}")
            reader = tar.extractfile(member)
            data = reader.read() if reader is not None else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise LazyFormatError(f"TOC tar is malformed: {exc}") from None
    if len(data) != member.size:
        raise LazyFormatError("TOC tar entry is truncated")
    return data


def parse_toc(toc_bytes: bytes, expected_toc_digest: str | None,
              location: TocLocation | None = None) -> TOC:
    """Parse the TOC gzip member (blob bytes [location.offset, footer)) into a `TOC`.

    `expected_toc_digest` is the layer's toc.digest annotation; when given the
    JSON must hash to it.  `location` (from `parse_footer`) bounds the last
    file's compressed size; without it that size is unknown.
    """
    data = toc_json(toc_bytes)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if expected_toc_digest is not None:
        check_digest(data, expected_toc_digest, "eStargz TOC")
    doc = load_json(data)
    return build_toc(LayerFormat.ESTARGZ, doc, digest, None if location is None else location.payload_end)


