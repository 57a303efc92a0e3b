"""Sending blob bytes: zero-copy `sendfile` from the store or from a file still
being downloaded, for a whole blob, one range, or `multipart/byteranges`."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from aiohttp import web

from fleetp2p.fetch import BlobSource
from fleetp2p.fetch.download import DownloadFailed
from fleetp2p.metrics import Metrics
from fleetp2p.registry.sendfile import send_file_range

log = logging.getLogger(__name__)

# Largest single sendfile call: bounds how stale the served-bytes metric gets.
SEND_CHUNK = 16 * 1024 * 1024
# While a blob is still arriving, wait for this much before a sendfile call
# (after the first one, which goes out at once): many tiny sendfile calls
# cost more event-loop time than the bytes they move.
SEND_BATCH = 1024 * 1024


class Span:
    """Bytes [start, end) of the blob, preceded by `prefix` (a multipart part header)."""

    __slots__ = ("prefix", "start", "end")

    def __init__(self, start: int, end: int, prefix: bytes = b"") -> None:
        self.prefix, self.start, self.end = prefix, start, end


def multipart(ranges: list[tuple[int, int]], size: int) -> tuple[str, list[Span], bytes]:
    """Boundary, one span per range (in request order) and the closing delimiter."""
    boundary = secrets.token_hex(16)
    spans = []
    for first, last in ranges:
        head = (f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Range: bytes {first}-{last}/{size}\r\n\r\n").encode()
        # every part after the first starts with the CRLF that ends the previous one
        spans.append(Span(first, last + 1, (b"\r\n" if spans else b"") + head))
    return boundary, spans, f"\r\n--{boundary}--\r\n".encode()


def body_length(spans: list[Span], trailer: bytes) -> int:
    return sum(len(s.prefix) + s.end - s.start for s in spans) + len(trailer)


async def send_spans(request: web.Request, response: web.StreamResponse, source: BlobSource,
                     spans: list[Span], trailer: bytes, metrics: Metrics, started: float) -> bool:
    """Stream the spans; False if the body could not be completed. If the source
    fails mid-way (a download that does not verify), the connection is aborted
    so the client never sees a complete body."""
    await response.prepare(request)
    reader = source.reader()
    first = True
    try:
        for span in spans:
            if span.prefix:
                await response.write(span.prefix)
            position = span.start
            while position < span.end:
                batch = 1 if first else min(SEND_BATCH, span.end - position)
                available = await source.wait_readable(position, batch)
                count = min(span.end, available, position + SEND_CHUNK) - position
                for index, within, n in reader.pieces(position, count):
                    f = reader.opened(index) or (reader.file(index) if source.hot else
                                                 await asyncio.to_thread(reader.file, index))
                    label = source.label_at(index * reader.geometry.segment_size + within)
                    if first:
                        metrics.ttfb.labels(label).observe(time.monotonic() - started)
                        first = False
                    await send_file_range(request, response, f, within, n)
                    metrics.served_bytes.labels(label).inc(n)
                position += count
        if trailer:
            await response.write(trailer)
        await response.write_eof()
        return True
    except ConnectionError as e:
        log.debug("client went away during %s: %s", request.path, e)
        return False
    except (DownloadFailed, OSError) as e:  # a download that failed, a file that fell short
        log.warning("aborting response for %s: %s", request.path, e)
        if request.transport is not None:
            request.transport.abort()
        return False
    finally:
        reader.close()
