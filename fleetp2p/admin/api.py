"""HTTP handlers of the admin API, under `/_fleetp2p/v1/` on the agent's listener.

    GET    /_fleetp2p/v1/status          → the agent's state (admin/status.py)
    POST   /_fleetp2p/v1/pull            {ref, platforms?, all_platforms?, pin?}
                                         → 200 application/x-ndjson: `resolved`, then
                                           blob_start/progress/blob_done, then `summary`
                                           or `error`; resolution errors are plain JSON
                                           {"error": ...} with 400/404/502 instead
    GET    /_fleetp2p/v1/pins            → {"pins": [...]}
    DELETE /_fleetp2p/v1/pins/{REF}      → {"unpinned": label, "digests": n} or 404; REF is
                                           the pin label or a reference naming it, URL-encoded
                                           (also accepted as ?ref=REF)

The listener is 127.0.0.1 by default; in addition every handler here refuses
a peer that is not loopback unless `admin_allow_remote` is set, because the
API has no authentication and a seed makes the agent fetch and pin anything.
Only `/_fleetp2p/v1/` is guarded: peers may later use other `/_fleetp2p/`
paths of the same listener.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from fleetp2p.admin.errors import AdminError, BadRequest, Forbidden, NotFound
from fleetp2p.admin.pull import PullJob
from fleetp2p.admin.resolve import Platform, resolve
from fleetp2p.admin.status import build_status
from fleetp2p.errors import FleetError, RegistryError, UpstreamError
from fleetp2p.oci.reference import ImageRef

if TYPE_CHECKING:
    from fleetp2p.agent import Agent

log = logging.getLogger(__name__)

ADMIN_API_PREFIX = "/_fleetp2p/v1"
NDJSON = "application/x-ndjson"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_admin_routes(app: web.Application, agent: "Agent") -> None:
    api = AdminApi(agent)
    guard = api.guarded
    app.router.add_get(f"{ADMIN_API_PREFIX}/status", guard(api.status))
    app.router.add_post(f"{ADMIN_API_PREFIX}/pull", guard(api.pull))
    app.router.add_get(f"{ADMIN_API_PREFIX}/pins", guard(api.pins))
    app.router.add_delete(f"{ADMIN_API_PREFIX}/pins/{{ref:.+}}", guard(api.unpin))
    app.router.add_delete(f"{ADMIN_API_PREFIX}/pins", guard(api.unpin))  # ?ref=REF


def is_loopback(remote: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback. No address at all
    means a unix socket, which only local processes can reach."""
    if not remote:
        return True
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def error_response(error: Exception, status: int) -> web.Response:
    return web.json_response({"error": str(error)}, status=status)


class AdminApi:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent

    def guarded(self, handler: Handler) -> Handler:
        """Loopback check plus errors as one-line JSON (never an HTML traceback page)."""
        async def wrapper(request: web.Request) -> web.StreamResponse:
            try:
                if not getattr(self.agent.config, "admin_allow_remote", False) and \
                        not is_loopback(request.remote):
                    raise Forbidden(f"the admin API answers loopback clients only, not "
                                    f"{request.remote} (agent config: admin_allow_remote = true)")
                return await handler(request)
            except AdminError as e:
                return error_response(e, e.status)
            except RegistryError as e:  # invalid reference syntax
                return error_response(e, 400 if e.status < 500 else e.status)
            except UpstreamError as e:
                return error_response(e, 502)
            except FleetError as e:
                return error_response(e, 500)
        wrapper.__name__ = handler.__name__
        return wrapper

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(build_status(self.agent))

    async def pins(self, request: web.Request) -> web.Response:
        return web.json_response({"pins": build_status(self.agent)["pins"]})

    async def unpin(self, request: web.Request) -> web.Response:
        text = (request.match_info.get("ref") or request.query.get("ref", "")).strip()
        if not text:
            raise BadRequest("missing reference: DELETE /pins/REF (URL-encoded) or /pins?ref=REF")
        store = self.agent.store
        pins = store.pins()
        label = text if text in pins else str(self._parse_ref(text))
        if label not in pins:
            known = ", ".join(sorted(pins)) or "none"
            raise NotFound(f"{label} is not pinned (pinned: {known})")
        store.unpin(label)
        log.info("unpinned %s (%d digests)", label, len(pins[label]))
        return web.json_response({"unpinned": label, "digests": len(pins[label])})

    async def pull(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        ref = self._parse_ref(body.get("ref"))
        platforms = self._platforms(body.get("platforms"))
        all_platforms = bool(body.get("all_platforms", False))
        pin = bool(body.get("pin", False))
        resolved = await resolve(self.agent.manifests, ref, platforms, all_platforms)
        job = PullJob(resolved, self.agent.blobs, self.agent.store, str(ref) if pin else None)
        log.info("%s %s → %s: %d blobs, %d bytes", "seed" if pin else "pull", ref, resolved.digest,
                 len(resolved.blobs), resolved.total_bytes)

        response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        queue.put_nowait({"event": "resolved", **resolved.to_json(), "pin": job.pin_label})
        task = asyncio.create_task(self._run(job, queue), name=f"admin pull {ref}")
        try:
            while (event := await queue.get()) is not None:
                await response.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")
        except (ConnectionError, asyncio.CancelledError) as e:
            # The CLI went away (Ctrl-C) or the agent stops: abort; the job restores
            # any pin it made. Downloads already started finish in the fetcher.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            log.info("%s %s aborted: %s", "seed" if pin else "pull", ref,
                     "client disconnected" if isinstance(e, ConnectionError) else "cancelled")
            if isinstance(e, asyncio.CancelledError):
                raise
            return response
        await task
        await response.write_eof()
        return response

    async def _run(self, job: PullJob, queue: "asyncio.Queue[dict[str, Any] | None]") -> None:
        try:
            summary = await job.run(queue.put_nowait)
            queue.put_nowait(summary)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reported to the client as the stream's last event
            if not isinstance(e, FleetError):
                log.exception("admin pull failed")
            queue.put_nowait({"event": "error", "message": str(e) or type(e).__name__})
        finally:
            queue.put_nowait(None)

    # Request parsing ------------------------------------------------------

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("request body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    def _parse_ref(self, text: Any) -> ImageRef:
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("missing reference")
        try:
            return ImageRef.parse(text.strip(), self.agent.config.default_registry)
        except RegistryError as e:
            raise BadRequest(f"invalid reference {text!r}: {e}") from None

    def _platforms(self, value: Any) -> list[Platform] | None:
        if value is None or value == []:
            return None
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise BadRequest("platforms must be a list of os/arch strings")
        return [Platform.parse(p) for p in value]
