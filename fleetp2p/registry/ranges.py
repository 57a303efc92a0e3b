"""HTTP Range requests (RFC 9110 §14) for blobs.

Lazy-pull clients depend on the details: stargz-snapshotter sends multi-range
requests and matches parts by Content-Range; containers/image wants exactly
one part per requested range, in request order, never merged. So ranges are
kept as asked, only clamped to the blob.
"""

from __future__ import annotations

import re

from fleetp2p.errors import RangeInvalid

MAX_RANGES = 4096
_SPEC_RE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total) of a reply's `Content-Range: bytes FIRST-LAST/TOTAL`
    (last inclusive, total None for `*`), or None if it is not one."""
    match = _CONTENT_RANGE_RE.match(value or "")
    if match is None or int(match.group(2)) < int(match.group(1)):
        return None
    total = match.group(3)
    return int(match.group(1)), int(match.group(2)), None if total == "*" else int(total)


def parse_range(header: str | None, size: int) -> list[tuple[int, int]] | None:
    """Inclusive (first, last) byte positions, or None to serve the whole blob.

    A header we cannot parse is ignored, as RFC 9110 requires; one that parses
    but selects no byte of the blob raises RangeInvalid (416).
    """
    if not header:
        return None
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parsed: list[tuple[str, str]] = []
    for spec in specs.split(","):
        if not spec.strip():
            continue
        match = _SPEC_RE.match(spec)
        if not match or (not match.group(1) and not match.group(2)):
            return None
        first, last = match.group(1), match.group(2)
        if first and last and int(first) > int(last):
            return None
        parsed.append((first, last))
    if not parsed:
        return None
    if len(parsed) > MAX_RANGES:
        raise RangeInvalid(f"more than {MAX_RANGES} ranges in one request", status=400)
    ranges = []
    for first, last in parsed:
        if not first:  # suffix: the last N bytes
            n = int(last)
            if n == 0 or size == 0:
                continue
            ranges.append((max(size - n, 0), size - 1))
            continue
        start = int(first)
        if start >= size:
            continue
        end = min(int(last), size - 1) if last else size - 1
        ranges.append((start, end))
    if not ranges:
        raise RangeInvalid(f"range {header!r} not satisfiable for a blob of {size} bytes",
                           detail={"size": size})
    return ranges
