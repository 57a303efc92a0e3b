"""The tracker's HTTP API (aiohttp): msgpack in, msgpack out, under /v1/.

`create_app(backend)` returns an Application that an agent can mount as a
sub-app (`parent.add_subapp("/tracker/", app)`) or run on its own listener
(`tracker.run`). The app owns the backend's lifecycle: it calls
`backend.start()` on startup and `backend.close()` on cleanup.

Auth: with a token configured, everything under /v1/ (including
/v1/health) needs `Authorization: Bearer <token>`. `/healthz` (plain
liveness for load balancers and systemd) and `/metrics` (counts with bounded
labels, no digests or node ids) stay open so probes and Prometheus need no
secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
from typing import Any, Awaitable, Callable

import msgpack
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tracker.backend import Backend
from tracker.errors import ApiError, BadRequest, BlobUnknown, Unauthorized, UnsupportedMediaType
from tracker.metrics import TrackerMetrics
from tracker.models import (MAX_METAINFO, Node, check_digest, check_holding, check_int,
                            check_node_id, check_segments)

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/msgpack"
_ACCEPTED_TYPES = {"", CONTENT_TYPE, "application/x-msgpack", "application/octet-stream"}
MAX_FETCHING = 1024                  # blobs one node downloads at once
MAX_BODY = 16 * 1024 * 1024          # announces of many blobs, 4 MiB metainfo
BACKEND = web.AppKey("tracker_backend", object)
METRICS = web.AppKey("tracker_metrics", TrackerMetrics)
_CLOSING = web.AppKey("tracker_closing", asyncio.Event)
_CONFIG = web.AppKey("tracker_config", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(backend: Backend, token: str | None = None, *,
               registry: CollectorRegistry | None = None, sweep_interval: float = 5.0,
               max_wait: float = 60.0) -> web.Application:
    """A tracker application over `backend`; `registry` lets an embedding agent collect our metrics."""
    metrics = TrackerMetrics(registry)
    app = web.Application(middlewares=[_middleware], client_max_size=MAX_BODY)
    app[BACKEND] = backend
    app[METRICS] = metrics
    app[_CONFIG] = {"token": token.encode() if token else None, "max_wait": max_wait,
                    "sweep_interval": sweep_interval}
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_on_shutdown)
    r = app.router
    r.add_get("/healthz", _healthz)
    r.add_get("/metrics", _metrics)
    r.add_get("/v1/health", _health)
    r.add_put("/v1/blobs/{digest}", _put_blob)
    r.add_get("/v1/blobs/{digest}", _get_blob)
    r.add_post("/v1/blobs/{digest}/leases", _claim)
    r.add_post("/v1/blobs/{digest}/leases/renew", _renew)
    r.add_post("/v1/blobs/{digest}/leases/release", _release)
    r.add_put("/v1/blobs/{digest}/segments/{index}", _publish)
    r.add_delete("/v1/blobs/{digest}/segments/{index}", _withdraw)
    r.add_get("/v1/blobs/{digest}/peers", _peers)
    r.add_get("/v1/blobs/{digest}/wait", _wait)
    r.add_post("/v1/announce", _announce)
    r.add_delete("/v1/nodes/{node}", _leave)
    return app


async def _lifecycle(app: web.Application):
    backend: Backend = app[BACKEND]
    app[_CLOSING] = asyncio.Event()
    await backend.start()
    task = asyncio.create_task(_housekeeping(app), name="tracker-housekeeping")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await backend.close()


async def _on_shutdown(app: web.Application) -> None:
    if _CLOSING in app:
        app[_CLOSING].set()     # long-polls answer now instead of holding shutdown for a minute


async def _housekeeping(app: web.Application) -> None:
    backend: Backend = app[BACKEND]
    while True:
        await asyncio.sleep(app[_CONFIG]["sweep_interval"])
        try:
            await backend.sweep()
            app[METRICS].set_stats(await backend.stats())
        except Exception as e:  # noqa: BLE001 - keep sweeping once the backend is back
            log.debug("tracker: housekeeping failed: %s", e)


# Plumbing -----------------------------------------------------------------------

def _public(handler: Handler) -> Handler:
    handler.public = True  # type: ignore[attr-defined]
    return handler


def _pack(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgpack.packb(obj, use_bin_type=True), status=status,
                        content_type=CONTENT_TYPE)


def _error(status: int, code: str, message: str) -> web.Response:
    response = _pack({"error": code, "message": message}, status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="fleetp2p-tracker"'
    return response


_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "TOO_LARGE"}


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        config = request.config_dict[_CONFIG]
        if config["token"] and not getattr(request.match_info.handler, "public", False):
            _authorize(request, config["token"])
        response = await handler(request)
        status = response.status
        return response
    except ApiError as e:
        status = e.status
        return _error(e.status, e.code, e.message)
    except web.HTTPException as e:
        status = e.status
        return _error(e.status, _HTTP_CODES.get(e.status, "HTTP_ERROR"), e.reason)
    except Exception:
        log.exception("tracker: %s %s failed", request.method, request.path)
        return _error(500, "INTERNAL", "internal error")
    finally:
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        request.config_dict[METRICS].observe(endpoint, request.method, status,
                                             time.perf_counter() - started)


def _authorize(request: web.Request, token: bytes) -> None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
        raise Unauthorized("missing or invalid bearer token")


async def _body(request: web.Request) -> dict[str, Any]:
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype not in _ACCEPTED_TYPES:
        raise UnsupportedMediaType(f"expected {CONTENT_TYPE}, got {ctype}")
    raw = await request.read()
    if not raw:
        return {}
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - msgpack raises many types
        raise BadRequest("body is not valid msgpack") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a msgpack map")
    return data


def _digest(request: web.Request) -> str:
    return check_digest(request.match_info["digest"])


def _index(request: web.Request) -> int:
    text = request.match_info["index"]
    if not text.isdigit() or len(text) > 7:
        raise BadRequest(f"invalid segment index {text[:20]!r}")
    return int(text)


def _query_int(request: web.Request, name: str, lo: int, hi: int, default: int | None) -> int | None:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    if not re.fullmatch(r"-?\d{1,19}", text):
        raise BadRequest(f"{name}: expected an integer, got {text[:20]!r}")
    return check_int(int(text), name, lo, hi)


def _query_label(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is not None and len(value) > 128:
        raise BadRequest(f"{name}: too long")
    return value or None


# Handlers ---------------------------------------------------------------------

@_public
async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


@_public
async def _metrics(request: web.Request) -> web.Response:
    metrics: TrackerMetrics = request.config_dict[METRICS]
    with contextlib.suppress(Exception):     # a Redis outage must not hide the other metrics
        metrics.set_stats(await request.config_dict[BACKEND].stats())
    return web.Response(body=generate_latest(metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _health(request: web.Request) -> web.Response:
    backend: Backend = request.config_dict[BACKEND]
    await backend.ping()
    return _pack({"status": "ok", "backend": backend.name})


async def _put_blob(request: web.Request) -> web.Response:
    digest, body = _digest(request), await _body(request)
    size = check_int(body.get("size"), "size", 0, 2 ** 62)
    seg, piece = body.get("segment_size"), body.get("piece_size")
    record, created = await request.config_dict[BACKEND].register(digest, size, seg, piece)
    return _pack(record.to_wire(), 201 if created else 200)


async def _get_blob(request: web.Request) -> web.Response:
    digest = _digest(request)
    record = await request.config_dict[BACKEND].get_blob(digest)
    if record is None:
        raise BlobUnknown(f"unknown blob {digest}")
    return _pack(record.to_wire())


async def _claim(request: web.Request) -> web.Response:
    digest, body = _digest(request), await _body(request)
    node = check_node_id(body.get("node"))
    segments = body.get("segments")
    segments = None if segments is None else check_segments(segments)
    count = check_int(body.get("count", 1), "count", 1, 1 << 16)
    grant = await request.config_dict[BACKEND].claim(digest, node, segments, count)
    metrics: TrackerMetrics = request.config_dict[METRICS]
    metrics.leases_granted.inc(len(grant.granted) - len(grant.renewed))
    metrics.leases_reclaimed.inc(len(grant.reclaimed))
    return _pack(grant.to_wire())


async def _renew(request: web.Request) -> web.Response:
    digest, body = _digest(request), await _body(request)
    node = check_node_id(body.get("node"))
    renewal = await request.config_dict[BACKEND].renew(digest, node,
                                                       check_segments(body.get("segments")))
    return _pack(renewal.to_wire())


async def _release(request: web.Request) -> web.Response:
    digest, body = _digest(request), await _body(request)
    node = check_node_id(body.get("node"))
    segments = body.get("segments")
    segments = None if segments is None else check_segments(segments)
    released = await request.config_dict[BACKEND].release(digest, node, segments)
    return _pack({"released": released})


async def _publish(request: web.Request) -> web.Response:
    digest, index, body = _digest(request), _index(request), await _body(request)
    node = check_node_id(body.get("node"))
    metainfo = body.get("metainfo")
    if not isinstance(metainfo, bytes) or not 0 < len(metainfo) <= MAX_METAINFO:
        raise BadRequest(f"metainfo: expected 1..{MAX_METAINFO} bytes (msgpack bin)")
    record = await request.config_dict[BACKEND].publish(digest, index, node, metainfo)
    request.config_dict[METRICS].segments_published.inc()
    return _pack(record.to_wire())


async def _withdraw(request: web.Request) -> web.Response:
    digest, index = _digest(request), _index(request)
    expected = request.query.get("info_hash") or None
    if expected is not None and not re.fullmatch(r"[0-9a-f]{40}", expected):
        raise BadRequest("info_hash: expected 40 lowercase hex digits")
    record = await request.config_dict[BACKEND].withdraw(digest, index, expected)
    request.config_dict[METRICS].segments_withdrawn.inc()
    return _pack(record.to_wire())


async def _announce(request: web.Request) -> web.Response:
    body = await _body(request)
    node = Node.from_wire(body)
    blobs = body.get("blobs") or {}
    removed = body.get("removed") or []
    fetching = body.get("fetching") or []
    if not isinstance(blobs, dict) or not isinstance(removed, list) or \
            not isinstance(fetching, list) or len(fetching) > MAX_FETCHING:
        raise BadRequest("blobs: expected a map digest -> 'all' | [segments]; removed and "
                         f"fetching: lists (fetching: at most {MAX_FETCHING})")
    holdings = {check_digest(d): check_holding(h, f"blobs[{d}]") for d, h in blobs.items()}
    reply = await request.config_dict[BACKEND].announce(
        node, holdings, [check_digest(d) for d in removed], bool(body.get("full")),
        {check_digest(d) for d in fetching})
    request.config_dict[METRICS].announces.inc()
    return _pack(reply.to_wire())


async def _leave(request: web.Request) -> web.Response:
    node = check_node_id(request.match_info["node"])
    return _pack({"removed": await request.config_dict[BACKEND].leave(node)})


async def _peers(request: web.Request) -> web.Response:
    digest = _digest(request)
    node = request.query.get("node") or None
    if node is not None:
        check_node_id(node)
    segment = _query_int(request, "segment", 0, 1 << 20, None)
    limit = _query_int(request, "limit", 1, 1000, 20)
    peers = await request.config_dict[BACKEND].peers(
        digest, node, segment, limit, _query_label(request, "zone"), _query_label(request, "rack"))
    return _pack({"peers": [p.to_wire() for p in peers]})


async def _wait(request: web.Request) -> web.Response:
    digest = _digest(request)
    config = request.config_dict[_CONFIG]
    since = _query_int(request, "since", -1, 1 << 62, None)
    if since is None:
        raise BadRequest("since: required (the version you already have)")
    try:
        timeout = float(request.query.get("timeout", 30))
    except ValueError:
        raise BadRequest("timeout: expected seconds") from None
    if not 0 <= timeout <= config["max_wait"]:
        raise BadRequest(f"timeout: expected 0..{config['max_wait']} seconds")
    backend: Backend = request.config_dict[BACKEND]
    metrics: TrackerMetrics = request.config_dict[METRICS]
    metrics.waiters.inc()
    waiter = asyncio.ensure_future(backend.wait(digest, since, timeout))
    closing = asyncio.ensure_future(request.config_dict[_CLOSING].wait())
    try:
        await asyncio.wait({waiter, closing}, return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            record = waiter.result()
        else:
            record = await backend.get_blob(digest)
            if record is None:
                raise BlobUnknown(f"unknown blob {digest}")
    finally:
        metrics.waiters.dec()
        for task in (waiter, closing):
            task.cancel()
        await asyncio.gather(waiter, closing, return_exceptions=True)
    return _pack(record.to_wire())
