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
import json
import re
import struct
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleetp2p.lazy.toc import (
    DIGEST_RE,
    MAX_TOC_SIZE,
    TOC,
    Chunk,
    Entry,
    LayerFormat,
    LazyFormatError,
    TocLocation,
    check_digest,
    clean_name,
    inflate,
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
_HEX16 = re.compile(rb"[0-9a-fA-F]{16}")  # use fullmatch


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


# --- TOC JSON ------------------------------------------------------------------
# The schema is CRFS's stargz TOC.  zstd:chunked declares its manifest as the
# same schema ("manifest type 1 = CRFS") with two additions, `endOffset` and
# `chunkType`, so zstdchunked.py builds its TOC with this code too.

ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo"})
_MAX_INT = (1 << 63) - 1


def load_json(data: bytes) -> Any:
    """json.loads that fails closed (deep nesting and bad UTF-8 included)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise LazyFormatError(f"TOC is not valid JSON: {exc}") from None


def _int(raw: dict[str, Any], key: str) -> int:
    value = raw.get(key, 0)
    if value is None:
        value = 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
        raise LazyFormatError(f"TOC field {key!r} is not a non-negative integer: {value!r}")
    return value


def _str(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise LazyFormatError(f"TOC field {key!r} is not a string: {value!r}")
    return value


def _digest(raw: dict[str, Any], key: str) -> str | None:
    value = _str(raw, key)
    if not value:
        return None
    if not DIGEST_RE.fullmatch(value):
        raise LazyFormatError(f"TOC field {key!r} is not a supported digest: {value!r}")
    return value


@dataclass
class _Draft:
    raw: dict[str, Any]
    name: str
    chunks: list[dict[str, Any]]


def build_toc(fmt: LayerFormat, doc: Any, digest: str, payload_end: int | None) -> TOC:
    """Turn decoded TOC JSON (either format) into a validated `TOC`.

    The two formats differ only in optional fields: zstd:chunked may record
    `endOffset` (the end of a file's last frame) and `chunkType`; eStargz may
    record `innerOffset`.  Where no end is recorded a chunk's stream ends
    where the next stream starts, or at `payload_end` for the last one.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise LazyFormatError("TOC JSON has no entries list")
    if doc.get("version") != 1:
        raise LazyFormatError(f"unsupported TOC version {doc.get('version')!r}")
    drafts: list[_Draft] = []
    current: _Draft | None = None
    for raw in doc["entries"]:
        if not isinstance(raw, dict):
            raise LazyFormatError("TOC entry is not an object")
        typ = _str(raw, "type")
        if typ == "chunk":
            if current is None:
                raise LazyFormatError("chunk entry without a preceding regular file")
            current.chunks.append(raw)
            continue
        if typ not in ENTRY_TYPES:
            raise LazyFormatError(f"unknown TOC entry type {typ!r}")
        draft = _Draft(raw, clean_name(_str(raw, "name")), [raw] if typ == "reg" else [])
        current = draft if typ == "reg" else None
        drafts.append(draft)

    chunk_lists = [_chunks_of(fmt, d) for d in drafts]
    _assign_ends(drafts, chunk_lists, payload_end)
    entries = tuple(_entry_of(d, tuple(cs)) for d, cs in zip(drafts, chunk_lists))
    return TOC(fmt, digest, entries, payload_end)


def _chunks_of(fmt: LayerFormat, d: _Draft) -> list[dict[str, Any]]:
    """Validated chunk records (as dicts) of one regular file, contiguous from 0 to size."""
    if _str(d.raw, "type") != "reg":
        return []
    size = _int(d.raw, "size")
    if size == 0:
        if len(d.chunks) > 1:
            raise LazyFormatError(f"{d.name!r}: empty file has chunk entries")
        return []
    single = len(d.chunks) == 1
    out: list[dict[str, Any]] = []
    pos = 0
    for i, raw in enumerate(d.chunks):
        chunk_type = _str(raw, "chunkType")
        if chunk_type not in ("", "zeros") or (chunk_type and fmt is not LayerFormat.ZSTD_CHUNKED):
            raise LazyFormatError(f"{d.name!r}: unknown chunk type {chunk_type!r}")
        file_offset = _int(raw, "chunkOffset")
        length = _int(raw, "chunkSize") or (size - file_offset)
        offset = _int(raw, "offset")
        if file_offset != pos or length <= 0 or file_offset + length > size:
            raise LazyFormatError(f"{d.name!r}: chunks do not tile the file at chunk {i}")
        inner = _int(raw, "innerOffset")
        if offset == 0 and inner == 0:  # only a stream shared from the blob's start sits at 0
            raise LazyFormatError(f"{d.name!r}: chunk {i} has no blob offset")
        # A file stored as one piece carries only the file digest, which then
        # is the chunk digest too.
        digest = _digest(raw, "chunkDigest") or (_digest(d.raw, "digest") if single else None)
        out.append({"offset": offset, "inner": inner, "file_offset": file_offset,
                    "size": length, "digest": digest, "zeros": chunk_type == "zeros"})
        pos += length
    if pos != size:
        raise LazyFormatError(f"{d.name!r}: chunks cover {pos} of {size} bytes")
    return out


def _assign_ends(drafts: Sequence[_Draft], chunk_lists: list[list[dict[str, Any]]],
                 payload_end: int | None) -> None:
    """Give every chunk its compressed end (see `build_toc`).

    A stream runs to the next larger chunk offset in blob order; chunks that
    share a stream (same offset, different innerOffset) share its end.
    """
    next_start, later = payload_end, None
    for d, chunks in zip(reversed(drafts), reversed(chunk_lists)):
        for c in reversed(chunks):
            if later is not None and c["offset"] != later:
                next_start = later
            c["end"], later = next_start, c["offset"]
        end_offset = _int(d.raw, "endOffset")
        if chunks and end_offset:
            chunks[-1]["end"] = end_offset
        for c in chunks:
            end = c["end"]
            if payload_end is not None and c["offset"] >= payload_end:
                raise LazyFormatError(f"{d.name!r}: chunk offset {c['offset']} is past the file data")
            if end is not None and (end <= c["offset"] or (payload_end is not None and end > payload_end)):
                raise LazyFormatError(f"{d.name!r}: chunk at {c['offset']} has a bad end {end}")


def _entry_of(d: _Draft, chunks: tuple[dict[str, Any], ...]) -> Entry:
    raw = d.raw
    xattrs = raw.get("xattrs") or {}
    if not isinstance(xattrs, dict) or not all(isinstance(v, str) for v in xattrs.values()):
        raise LazyFormatError(f"{d.name!r}: xattrs are not a string map")
    modtime = raw.get("modtime")
    return Entry(
        name=d.name,
        type=_str(raw, "type"),
        size=_int(raw, "size"),
        mode=_int(raw, "mode"),
        uid=_int(raw, "uid"),
        gid=_int(raw, "gid"),
        link_name=_str(raw, "linkName"),
        digest=_digest(raw, "digest"),
        modtime=modtime if isinstance(modtime, str) else None,
        dev_major=_int(raw, "devMajor"),
        dev_minor=_int(raw, "devMinor"),
        xattrs=dict(xattrs),
        chunks=tuple(
            Chunk(path=d.name, compressed_offset=c["offset"],
                  compressed_size=None if c["end"] is None else c["end"] - c["offset"],
                  file_offset=c["file_offset"], size=c["size"], digest=c["digest"],
                  inner_offset=c["inner"], zeros=c["zeros"])
            for c in chunks),
    )
