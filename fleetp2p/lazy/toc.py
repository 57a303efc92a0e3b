"""The format-neutral table of contents of a lazily pullable layer.

eStargz and zstd:chunked describe a layer the same way: a list of tar entries
in which each non-empty regular file is backed by one or more *chunks*, each
chunk an independently decompressible region of the blob with a digest of its
uncompressed bytes.  Both parsers turn their JSON into the `TOC` below, so the
agent has one way to ask "which byte ranges do I need for this file range" and
one way to turn fetched bytes back into verified file content.

Nothing here does I/O: callers fetch the ranges and hand the bytes in.
"""

from __future__ import annotations

import enum
import hashlib
import io
import posixpath
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import zstandard

from fleetp2p.errors import FleetError, VerificationError

# The TOC is untrusted until its digest is checked, and even then a hostile
# but well-signed image must not make us allocate without bound.  150 MiB is
# the limit containers/storage applies to the same data.
MAX_TOC_SIZE = 150 << 20

PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")  # use fullmatch


class LazyError(FleetError):
    """Base of errors raised by the lazy-pull format readers."""


class LazyFormatError(LazyError):
    """The layer, its footer, its TOC or a chunk is malformed or does not verify.

    The agent treats this as "do not lazily serve this layer": it falls back
    to fetching and verifying the whole blob.
    """


class DigestMismatch(LazyFormatError, VerificationError):
    """Bytes did not hash to the digest the (verified) TOC or annotation promised."""


class NoSuchEntry(LazyError):
    """The path is not in the TOC, or is not a regular file where one is needed."""


class LayerFormat(str, enum.Enum):
    """Which lazy format a layer is in; also selects the chunk decompressor."""

    ESTARGZ = "estargz"
    ZSTD_CHUNKED = "zstd:chunked"


@dataclass(frozen=True)
class TocLocation:
    """Where the TOC lives in the blob, as told by the footer or the annotations.

    `payload_end` is the first byte after the last file chunk; it bounds the
    compressed size of chunks whose end the TOC does not record itself.
    """

    offset: int
    length: int | None
    payload_end: int
    uncompressed_length: int | None = None
    footer_size: int = 0  # 0 when the location came from annotations
    tar_split: tuple[int, int, int] | None = None  # zstd:chunked (offset, length, uncompressed)

    @property
    def end(self) -> int | None:
        return None if self.length is None else self.offset + self.length


@dataclass(frozen=True)
class Chunk:
    """One independently decodable piece of a regular file.

    The chunk's bytes are the `size` bytes that follow `inner_offset` bytes of
    the decompressed stream that starts at `compressed_offset` in the blob.
    `compressed_size` is None only when the stream's end is unknown (the TOC
    was parsed without a `TocLocation` and nothing else bounds it).  `size`
    can be a whole large file (one stored in a single piece): a caller that
    bounds memory checks it before decoding.
    """

    path: str
    compressed_offset: int
    compressed_size: int | None
    file_offset: int
    size: int
    digest: str | None
    inner_offset: int = 0
    zeros: bool = False  # zstd:chunked hole: rebuilt without fetching

    @property
    def compressed_end(self) -> int | None:
        if self.compressed_size is None:
            return None
        return self.compressed_offset + self.compressed_size


@dataclass(frozen=True)
class Entry:
    """A tar entry as the TOC describes it (chunks only for non-empty regular files)."""

    name: str
    type: str
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    link_name: str = ""
    digest: str | None = None
    modtime: str | None = None
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)
    chunks: tuple[Chunk, ...] = ()

    @property
    def offset(self) -> int | None:
        """Where the file's first chunk starts in the blob (None for no data)."""
        return self.chunks[0].compressed_offset if self.chunks else None


def clean_name(name: str) -> str:
    """Normalise a tar path the way both formats' readers do ("./a/b/" -> "a/b")."""
    return posixpath.normpath("/" + name.lstrip("/")).lstrip("/")


@dataclass
class TOC:
    """Entries in blob order plus the lookups the agent needs."""

    format: LayerFormat
    digest: str
    entries: tuple[Entry, ...]
    payload_end: int | None = None
    _by_name: dict[str, Entry] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Later duplicates win, as when the tar is extracted.
        self._by_name = {e.name: e for e in self.entries}

    def lookup(self, path: str, *, follow_hardlinks: bool = True) -> Entry | None:
        entry = self._by_name.get(clean_name(path))
        seen = 0
        while follow_hardlinks and entry is not None and entry.type == "hardlink":
            seen += 1
            if seen > 64:  # a loop of hardlinks is malformed, not a hang
                raise LazyFormatError(f"hardlink loop at {path!r}")
            entry = self._by_name.get(clean_name(entry.link_name))
        return entry

    def file(self, path: str) -> Entry:
        """The regular file at `path` (through hardlinks), or NoSuchEntry."""
        entry = self.lookup(path)
        if entry is None:
            raise NoSuchEntry(f"{path!r} is not in the layer")
        if entry.type != "reg":
            raise NoSuchEntry(f"{path!r} is a {entry.type}, not a regular file")
        return entry

    def chunks_for(self, path: str, offset: int = 0, length: int | None = None) -> list[Chunk]:
        """Chunks overlapping file bytes [offset, offset+length) (to EOF when length is None)."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must be non-negative")
        entry = self.file(path)
        end = entry.size if length is None else min(entry.size, offset + length)
        return [c for c in entry.chunks if c.file_offset < end and c.file_offset + c.size > offset]

    @property
    def landmark(self) -> str | None:
        """Which landmark file the layer carries, if any (eStargz prioritised files)."""
        for name in (NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK):
            if name in self._by_name:
                return name
        return None

    def prefetch_range(self) -> tuple[int, int] | None:
        """Blob bytes to prefetch: (0, landmark offset), (0, 0) for "no prefetch", None if unsaid."""
        if NO_PREFETCH_LANDMARK in self._by_name:
            return (0, 0)
        mark = self._by_name.get(PREFETCH_LANDMARK)
        if mark is None:
            return None
        if mark.offset is None:
            raise LazyFormatError("prefetch landmark has no offset")
        return (0, mark.offset)

    def prefetch_entries(self) -> list[Entry]:
        """Entries the image author prioritised: those before the prefetch landmark."""
        if PREFETCH_LANDMARK not in self._by_name:
            return []
        out: list[Entry] = []
        for entry in self.entries:
            if entry.name == PREFETCH_LANDMARK:
                return out
            out.append(entry)
        return out


def fetch_ranges(chunks: Iterable[Chunk], *, gap: int = 0) -> list[tuple[int, int]]:
    """Sorted, merged [start, end) blob ranges covering the chunks' compressed bytes.

    Holes need no bytes; chunks sharing one stream are fetched once; ranges
    closer than `gap` bytes are merged so a caller can trade bytes for requests.
    """
    spans = []
    for c in chunks:
        if c.zeros:
            continue
        if c.compressed_end is None:
            raise LazyFormatError(f"end of the chunk at {c.compressed_offset} is unknown")
        spans.append((c.compressed_offset, c.compressed_end))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1] + gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


# --- decoding -----------------------------------------------------------------


def check_digest(data: bytes, expected: str, what: str) -> None:
    """Raise DigestMismatch unless `data` hashes to the OCI digest `expected`."""
    algo, _, _ = expected.partition(":")
    if not DIGEST_RE.fullmatch(expected):
        raise LazyFormatError(f"{what}: unsupported or malformed digest {expected!r}")
    actual = f"{algo}:{hashlib.new(algo, data).hexdigest()}"
    if actual != expected:
        raise DigestMismatch(f"{what}: digest {actual} does not match {expected}")


def _inflate_gzip(data: bytes, want: int) -> bytes:
    """First `want` bytes of a (multi-member) gzip stream, never inflating more."""
    out = bytearray()
    rest = data
    try:
        while len(out) < want and rest:
            d = zlib.decompressobj(31)
            out += d.decompress(rest, want - len(out))
            while not d.eof and len(out) < want and d.unconsumed_tail:
                out += d.decompress(d.unconsumed_tail, want - len(out))
            if not d.eof:
                break
            rest = d.unused_data
    except zlib.error as exc:
        raise LazyFormatError(f"gzip data is corrupt: {exc}") from None
    return bytes(out)


def _inflate_zstd(data: bytes, want: int) -> bytes:
    """First `want` bytes of a stream of zstd frames, never inflating more."""
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
        while len(out) < want:
            piece = reader.read(want - len(out))
            if not piece:
                break
            out += piece
    except zstandard.ZstdError as exc:
        raise LazyFormatError(f"zstd data is corrupt: {exc}") from None
    return bytes(out)


def inflate(fmt: LayerFormat, data: bytes, want: int) -> bytes:
    """Decompress at most `want` bytes with the format's codec (gzip or zstd)."""
    if fmt is LayerFormat.ESTARGZ:
        return _inflate_gzip(data, want)
    return _inflate_zstd(data, want)


def decode_chunk(fmt: LayerFormat, compressed: bytes, chunk: Chunk, *, verify: bool = True) -> bytes:
    """Decompress one chunk from bytes starting at its compressed offset and verify it.

    `verify=False` is for a chunk whose TOC has no chunk digest and whose
    file digest the caller checks instead (see `read_file`).
    """
    if chunk.zeros:
        out = bytes(chunk.size)
    else:
        out = inflate(fmt, compressed, chunk.inner_offset + chunk.size)[chunk.inner_offset:]
        if len(out) != chunk.size:
            raise LazyFormatError(
                f"{chunk.path}@{chunk.file_offset}: stream ended after {len(out)} of {chunk.size} bytes")
    if verify:
        if chunk.digest is None:
            raise LazyFormatError(f"{chunk.path}@{chunk.file_offset}: chunk has no digest to verify")
        check_digest(out, chunk.digest, f"chunk {chunk.path}@{chunk.file_offset}")
    return out


ReadFn = Callable[[int, int], bytes]
"""Returns blob bytes [start, end) the caller has already fetched."""


def read_file(toc: TOC, path: str, read: ReadFn, offset: int = 0, length: int | None = None) -> bytes:
    """File bytes [offset, offset+length) from fetched blob bytes, every chunk verified.

    A chunk without its own digest is accepted only when the whole file is
    read and the file digest covers it.
    """
    entry = toc.file(path)
    chunks = toc.chunks_for(path, offset, length)
    whole = offset == 0 and (length is None or length >= entry.size)
    parts: list[bytes] = []
    for c in chunks:
        if c.digest is None and not (whole and entry.digest):
            raise LazyFormatError(f"{entry.name}@{c.file_offset}: chunk has no digest to verify")
        data = b"" if c.zeros else read(c.compressed_offset, _end_of(c))
        parts.append(decode_chunk(toc.format, data, c, verify=c.digest is not None))
    if not chunks:
        if whole and entry.digest:
            check_digest(b"", entry.digest, f"file {entry.name}")
        return b""
    joined = b"".join(parts)
    if whole and entry.digest:
        check_digest(joined, entry.digest, f"file {entry.name}")
    start = offset - chunks[0].file_offset
    stop = None if length is None else start + length
    return joined[start:stop]


def assemble_file(toc: TOC, path: str, read: ReadFn) -> bytes:
    """The whole file, chunk digests and (when the TOC has one) the file digest verified."""
    return read_file(toc, path, read)


def _end_of(chunk: Chunk) -> int:
    if chunk.compressed_end is None:
        raise LazyFormatError(f"end of the chunk at {chunk.compressed_offset} is unknown")
    return chunk.compressed_end
