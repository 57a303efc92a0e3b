"""Registry authentication: the Bearer token flow and Basic auth.

A registry tells us how to authenticate in its 401 `WWW-Authenticate`
challenge. Tokens are cached per (registry, scope) until shortly before they
expire, so a pull of many blobs costs one token request.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from dataclasses import dataclass

import aiohttp

from fleetp2p.errors import UpstreamError

_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
DEFAULT_TOKEN_LIFETIME = 60.0
EXPIRY_MARGIN = 10.0


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _PARAM_RE.finditer(rest)}
    return Challenge(scheme.lower(), params)


def basic_header(credentials: tuple[str, str]) -> str:
    raw = f"{credentials[0]}:{credentials[1]}".encode()
    return "Basic " + base64.b64encode(raw).decode()


class TokenCache:
    """Authorization header values per (registry, scope), with expiry."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str], tuple[str, float]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def get(self, registry: str, scope: str) -> str | None:
        value = self._values.get((registry, scope))
        if value is None:
            return None
        header, expires = value
        if time.monotonic() >= expires:
            self._values.pop((registry, scope), None)
            return None
        return header

    def put(self, registry: str, scope: str, header: str, lifetime: float) -> None:
        self._values[(registry, scope)] = (header, time.monotonic() + max(lifetime - EXPIRY_MARGIN, 1.0))

    def drop(self, registry: str, scope: str) -> None:
        self._values.pop((registry, scope), None)

    def lock(self, registry: str, scope: str) -> asyncio.Lock:
        """One token request at a time per scope: a burst of 401s costs one round trip."""
        return self._locks.setdefault((registry, scope), asyncio.Lock())


async def fetch_token(session: aiohttp.ClientSession, challenge: Challenge, scope: str,
                      credentials: tuple[str, str] | None,
                      timeout: aiohttp.ClientTimeout) -> tuple[str, float]:
    """Ask the challenge's realm for a token; returns (header value, lifetime seconds)."""
    realm = challenge.params.get("realm")
    if not realm or not realm.startswith(("http://", "https://")):
        raise UpstreamError(f"bearer challenge without a usable realm: {challenge.params}",
                            status=401, reason="auth")
    query = {}
    if challenge.params.get("service"):
        query["service"] = challenge.params["service"]
    if scope:
        query["scope"] = scope
    headers = {"Authorization": basic_header(credentials)} if credentials else {}
    try:
        async with session.get(realm, params=query, headers=headers, timeout=timeout,
                               allow_redirects=True) as resp:
            if resp.status in (401, 403):
                raise UpstreamError(f"token server {realm} refused the credentials ({resp.status})",
                                    status=resp.status, reason="auth")
            if resp.status != 200:
                raise UpstreamError(f"token server {realm} answered {resp.status}",
                                    status=502 if resp.status >= 500 else resp.status, reason="auth")
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        raise UpstreamError(f"token request to {realm} failed: {e or type(e).__name__}",
                            reason="auth") from None
    token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
    if not token or not isinstance(token, str):
        raise UpstreamError(f"token server {realm} returned no token", reason="auth")
    try:
        lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
    except (TypeError, ValueError):
        lifetime = DEFAULT_TOKEN_LIFETIME
    return f"Bearer {token}", lifetime
