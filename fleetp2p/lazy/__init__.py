"""Readers for lazily pullable layer formats (eStargz, zstd:chunked).

The agent's path through this package, all on bytes it fetched by range:

    plan = detect(desc.media_type, desc.annotations, desc.size)   # None: pull whole
    loc = plan.location or plan.parse_footer(tail_bytes, desc.size)
    toc = plan.parse_toc(blob[loc.offset:loc.end], loc)           # TOC digest verified
    chunks = toc.chunks_for(path, offset, length)
    ranges = fetch_ranges(chunks)                                  # what to request
    data = read_file(toc, path, read, offset, length)              # chunk digests verified

Every malformed input raises `LazyFormatError` (digest failures are its
subclass `DigestMismatch`), so "fall back to a whole-blob pull" is one except.
"""

from fleetp2p.lazy.detect import LayerPlan, detect
from fleetp2p.lazy.toc import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC,
    Chunk,
    DigestMismatch,
    Entry,
    LayerFormat,
    LazyError,
    LazyFormatError,
    NoSuchEntry,
    TocLocation,
    assemble_file,
    decode_chunk,
    fetch_ranges,
    read_file,
)

__all__ = [
    "NO_PREFETCH_LANDMARK", "PREFETCH_LANDMARK", "TOC", "Chunk", "DigestMismatch", "Entry",
    "LayerFormat", "LayerPlan", "LazyError", "LazyFormatError", "NoSuchEntry", "TocLocation",
    "assemble_file", "decode_chunk", "detect", "fetch_ranges", "read_file",
]
