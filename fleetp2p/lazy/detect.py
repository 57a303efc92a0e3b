"""Decide from a layer descriptor whether, and how, a layer can be read lazily.

Only the manifest is trusted (the agent verified it by digest), so the
descriptor's annotations are what make a lazy layer verifiable: a layer
without a TOC digest annotation is not served lazily at all, whatever its
bytes look like.  The plan also says which bytes to fetch first: the TOC
itself when a zstd:chunked position annotation gives it (one request),
otherwise the footer and then the TOC (two requests, always so for eStargz).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from fleetp2p.lazy import estargz, zstdchunked
from fleetp2p.lazy.toc import TOC, LayerFormat, LazyFormatError, TocLocation

GZIP_MEDIA_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})
ZSTD_MEDIA_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
})
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_SIZE_RE = re.compile(r"^[0-9]{1,19}$")


@dataclass(frozen=True)
class LayerPlan:
    """How to read one lazy layer: its format, what to verify, and where to start."""

    format: LayerFormat
    toc_digest: str | None  # eStargz: JSON digest; zstd:chunked: compressed-manifest checksum
    toc_json_digest: str | None = None  # zstd:chunked written by ctr-remote also carries this
    location: TocLocation | None = None  # known from annotations: no footer fetch needed
    uncompressed_size: int | None = None

    @property
    def footer_fetch_size(self) -> int:
        """Bytes to read from the end of the blob to find the TOC."""
        if self.format is LayerFormat.ESTARGZ:
            return estargz.FOOTER_FETCH_SIZE
        return zstdchunked.FOOTER_FETCH_SIZE

    def first_range(self, blob_size: int) -> tuple[int, int]:
        """[start, end) of the first request: the TOC itself if located, else the footer."""
        if self.location is not None and self.location.end is not None:
            return (self.location.offset, self.location.end)
        return (max(0, blob_size - self.footer_fetch_size), blob_size)

    def parse_footer(self, tail: bytes, blob_size: int) -> TocLocation:
        if self.format is LayerFormat.ESTARGZ:
            return estargz.parse_footer(tail, blob_size)
        return zstdchunked.parse_footer(tail, blob_size)

    def parse_toc(self, toc_bytes: bytes, location: TocLocation) -> TOC:
        """Parse and verify the TOC fetched from `location` against this plan's digests."""
        if self.format is LayerFormat.ESTARGZ:
            return estargz.parse_toc(toc_bytes, self.toc_digest, location)
        return zstdchunked.parse_toc(toc_bytes, self.toc_digest, location,
                                     expected_json_digest=self.toc_json_digest)


def detect(media_type: str, annotations: Mapping[str, str] | None,
           size: int | None = None) -> LayerPlan | None:
    """The lazy-read plan for a layer descriptor, or None to fetch it whole.

    Raises LazyFormatError when the annotations claim a lazy format but are
    malformed (the caller then fetches the layer whole, as for None).
    """
    annotations = annotations or {}
    json_digest = _digest(annotations.get(estargz.TOC_DIGEST_ANNOTATION))
    uncompressed = _uncompressed_size(annotations.get(estargz.UNCOMPRESSED_SIZE_ANNOTATION))
    if media_type in GZIP_MEDIA_TYPES:
        if json_digest is None:
            return None
        return LayerPlan(LayerFormat.ESTARGZ, json_digest, uncompressed_size=uncompressed)
    if media_type not in ZSTD_MEDIA_TYPES:
        return None
    checksum = _digest(zstdchunked.checksum_from_annotations(annotations))
    if checksum is None and json_digest is None:
        return None
    location = zstdchunked.location_from_annotations(annotations)
    if location is not None and size is not None and location.end is not None and location.end > size:
        raise LazyFormatError("zstd:chunked manifest position is past the end of the layer")
    return LayerPlan(LayerFormat.ZSTD_CHUNKED, checksum, toc_json_digest=json_digest,
                     location=location, uncompressed_size=uncompressed)


def _digest(value: str | None) -> str | None:
    if value is None:
        return None
    if not _DIGEST_RE.fullmatch(value):
        raise LazyFormatError(f"TOC digest annotation is not a sha256 digest: {value!r}")
    return value


def _uncompressed_size(value: str | None) -> int | None:
    if value is None:
        return None
    if not _SIZE_RE.fullmatch(value):
        raise LazyFormatError(f"malformed uncompressed-size annotation {value!r}")
    return int(value)
