"""The OCI Distribution pull API, read top to bottom: validate, resolve, send.

Errors become OCI error JSON. Whatever the mirror cannot obtain is a 404 —
never a 401 challenge, which would make clients fail instead of falling back
to their next mirror or the registry itself.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from fleetp2p.errors import (BlobUnknown, FleetError, ManifestUnknown, RegistryError,
                             TooManyRequests, Unsupported, UpstreamError, VerificationError)
from fleetp2p.fetch import BlobFetcher, BlobSource, ManifestService
from fleetp2p.lazy.reads import LazyReads
from fleetp2p.lazy.toc import LazyError
from fleetp2p.oci.reference import Digest
from fleetp2p.metrics import Metrics
from fleetp2p.registry.ranges import parse_range
from fleetp2p.registry.routes import Target, parse_target
from fleetp2p.registry.send import Span, body_length, multipart, send_spans

log = logging.getLogger(__name__)

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
READ_METHODS = ("GET", "HEAD")


class RegistryFront:
    def __init__(self, manifests: ManifestService, blobs: BlobFetcher, metrics: Metrics,
                 default_registry: str, lazy: LazyReads | None = None,
                 registry_in_path: bool = True) -> None:
        self.manifests = manifests
        self.lazy = lazy
        self.blobs = blobs
        self.metrics = metrics
        self.default_registry = default_registry
        self.registry_in_path = registry_in_path

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/v2", self.handle)
        app.router.add_route("*", "/v2/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        endpoint = "other"
        status = 500
        try:
            if request.method not in READ_METHODS:
                raise_unsupported(request.method)
            target = parse_target(request.match_info.get("tail", ""), request.query.get("ns"),
                                  self.default_registry, self.registry_in_path)
            endpoint = target.endpoint
            if target.endpoint == "base":
                response = web.json_response({}, headers=API_VERSION)
            elif target.endpoint == "manifest":
                response = await self.manifest(request, target)
            else:
                response = await self.blob(request, target, started)
            status = response.status if getattr(response, "completed", True) else 499
            return response
        except RegistryError as e:
            status = e.status
            return error_response(request, e)
        except UpstreamError as e:
            mapped = map_upstream_error(e, endpoint)
            status = mapped.status
            log.info("%s %s: %s", request.method, request.path_qs, e)
            return error_response(request, mapped)
        except (ConnectionError, OSError) as e:
            status = 499  # client went away or the response was aborted
            log.debug("%s %s: connection ended: %s", request.method, request.path_qs, e)
            raise
        finally:
            self.metrics.requests.labels(endpoint, request.method if request.method in READ_METHODS
                                         else "other", str(status)).inc()

    async def manifest(self, request: web.Request, target: Target) -> web.StreamResponse:
        manifest = await self.manifests.get(target.registry, target.repository, target.reference,
                                            accept_list(request))
        headers = {
            **API_VERSION,
            "Content-Type": manifest.media_type,
            "Docker-Content-Digest": str(manifest.digest),
            "ETag": f'"{manifest.digest}"',
        }
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(manifest.content))
            return web.Response(status=200, headers=headers)
        return web.Response(status=200, body=manifest.content, headers=headers)

    async def blob(self, request: web.Request, target: Target, started: float) -> web.StreamResponse:
        assert target.digest is not None
        digest = target.digest
        registry, repository = target.registry, target.repository
        if not target.explicit_registry:
            origin = self.manifests.origin(digest)
            if origin is not None:
                registry = origin[0]
        headers = {
            **API_VERSION,
            "Docker-Content-Digest": str(digest),
            "ETag": f'"{digest}"',
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            size = self.lazy.size_of(digest) if self.lazy and not self.blobs.local(digest) else None
            if size is None:
                size = await self.blobs.size(registry, repository, digest)
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Length"] = str(size)
            return web.Response(status=200, headers=headers)
        range_header = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if if_range is not None and if_range.strip() != headers["ETag"]:
            range_header = None
        source: BlobSource | None = None
        if range_header and self.lazy is not None and self.blobs.local(digest) is None \
                and not self.blobs.is_inflight(digest):
            size = self.lazy.size_of(digest)
            if size is not None:
                ranges = self._ranges(range_header, size, headers)
                if isinstance(ranges, web.Response):
                    return ranges
                if ranges and self.lazy.wants(digest, ranges, size):
                    source = await self._lazy_source(registry, repository, digest, ranges)
        if source is None:
            source = await self.blobs.open(registry, repository, digest)
        ranges = self._ranges(range_header, source.size, headers)
        if isinstance(ranges, web.Response):
            return ranges
        return await self._send(request, source, ranges, headers, started)

    async def _lazy_source(self, registry: str, repository: str, digest: Digest,
                           ranges: list[tuple[int, int]]) -> BlobSource:
        assert self.lazy is not None
        try:
            return await self.lazy.open(registry, repository, digest, ranges)
        except VerificationError as e:
            raise BlobUnknown(f"no verified copy: {e}", detail={"reason": "verification"}) from None
        except (LazyError, FleetError) as e:
            raise BlobUnknown(f"lazy read failed: {e}") from None

    def _ranges(self, header: str | None, size: int,
                headers: dict[str, str]) -> list[tuple[int, int]] | None | web.Response:
        try:
            return parse_range(header, size)
        except RegistryError as e:
            if e.status != 416:
                raise
            return error_response_for(e, {**headers, "Content-Range": f"bytes */{size}"})

    async def _send(self, request: web.Request, source: BlobSource,
                    ranges: list[tuple[int, int]] | None, headers: dict[str, str],
                    started: float) -> web.StreamResponse:
        size = source.size
        trailer = b""
        if ranges is None:
            status, spans = 200, [Span(0, size)]
            headers["Content-Type"] = "application/octet-stream"
        elif len(ranges) == 1:
            first, last = ranges[0]
            status, spans = 206, [Span(first, last + 1)]
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        else:
            boundary, spans, trailer = multipart(ranges, size)
            status = 206
            headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = body_length(spans, trailer)
        response.completed = await send_spans(request, response, source, spans, trailer,
                                              self.metrics, started)
        return response


def accept_list(request: web.Request) -> list[str]:
    """Every media type the client accepts, across repeated Accept lines and comma lists."""
    types: list[str] = []
    for line in request.headers.getall("Accept", []):
        for item in line.split(","):
            item = item.strip()
            if item and item not in types:
                types.append(item)
    return types


def map_upstream_error(error: UpstreamError, endpoint: str) -> RegistryError:
    if error.status == 429:
        return TooManyRequests("upstream registry is rate limiting; retry later")
    message = ("upstream: " + str(error)) if not error.not_found else "not found upstream"
    if endpoint == "blob":
        return BlobUnknown(message, detail={"upstream_status": error.status})
    return ManifestUnknown(message, detail={"upstream_status": error.status})


def raise_unsupported(method: str) -> None:
    raise Unsupported(f"{method} is not supported: this registry is a read-only pull-through mirror")


def error_response(request: web.Request, error: RegistryError,
                   headers: dict[str, str] | None = None) -> web.Response:
    if request.method == "HEAD":
        return web.Response(status=error.status, headers=_error_headers(error, headers))
    return error_response_for(error, headers)


def error_response_for(error: RegistryError, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error.to_json(), status=error.status,
                             headers=_error_headers(error, headers))


def _error_headers(error: RegistryError, headers: dict[str, str] | None) -> dict[str, str]:
    all_headers = {**API_VERSION, **(headers or {})}
    all_headers.pop("Content-Type", None)
    if error.status == 405:
        all_headers["Allow"] = "GET, HEAD"
    return all_headers
