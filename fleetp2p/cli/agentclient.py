"""HTTP client for the agent's admin API (`/_fleetp2p/v1/`), for the CLI.

Synchronous and stdlib-only on purpose: a CLI command makes one or two
requests, and starting an event loop plus an aiohttp session would cost more
than the requests. Every failure becomes one `FleetError` with a message fit
for a terminal; `UsageError` marks the ones that are the caller's fault
(exit code 2).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit

from fleetp2p.errors import FleetError

DEFAULT_AGENT_URL = "http://127.0.0.1:5050"
API = "/_fleetp2p/v1"
CONNECT_TIMEOUT = 5.0
# Resolving a tag can take a while when upstream retries; a pull stream then
# sends progress at least every 0.25 s, so a silent minute means a stuck agent.
READ_TIMEOUT = 120.0


class UsageError(FleetError):
    """The command line or the reference is wrong (exit code 2)."""


class AgentUnreachable(FleetError):
    """Nothing answers at the agent URL."""


class AgentError(FleetError):
    """The agent answered with an error."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class AgentClient:
    def __init__(self, url: str = DEFAULT_AGENT_URL, timeout: float = READ_TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"invalid agent URL {url!r}: expected http://HOST:PORT")
        try:
            port = parts.port
        except ValueError:
            raise UsageError(f"invalid agent URL {url!r}: bad port") from None
        self.url = f"{parts.scheme}://{parts.netloc}"
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = port or (443 if parts.scheme == "https" else 80)
        self.timeout = timeout

    # API ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self._json("GET", f"{API}/status")

    def unpin(self, ref: str) -> dict[str, Any]:
        return self._json("DELETE", f"{API}/pins/{quote(ref, safe='')}")

    def pull(self, ref: str, platforms: list[str] | None, all_platforms: bool,
             pin: bool) -> Iterator[dict[str, Any]]:
        """Events of one pull/seed, ending with `summary`; an `error` event raises."""
        body = json.dumps({"ref": ref, "platforms": platforms or [], "all_platforms": all_platforms,
                           "pin": pin}).encode()
        conn, resp = self._send("POST", f"{API}/pull", body)
        try:
            if resp.status != 200:
                self._raise_for(resp)
            for raw in _lines(resp, self._unreachable):
                try:
                    event = json.loads(raw)
                except ValueError:
                    raise AgentError(f"agent sent an unreadable progress line: {raw[:80]!r}",
                                     502) from None
                if event.get("event") == "error":
                    raise AgentError(event.get("message") or "pull failed", 500)
                yield event
                if event.get("event") == "summary":
                    return
            raise AgentError("the agent closed the progress stream before the pull finished", 502)
        finally:
            conn.close()

    # Transport ------------------------------------------------------------

    def _json(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        conn, resp = self._send(method, path, body)
        try:
            if resp.status != 200:
                self._raise_for(resp)
            try:
                data = json.loads(resp.read())
            except (ValueError, OSError) as e:
                raise AgentError(f"unreadable answer from the agent at {self.url}: {e}", 502) from None
            if not isinstance(data, dict):
                raise AgentError(f"unexpected answer from the agent at {self.url}", 502)
            return data
        finally:
            conn.close()

    def _send(self, method: str, path: str,
              body: bytes | None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=CONNECT_TIMEOUT)
        headers = {"Accept": "application/json, application/x-ndjson", "User-Agent": "fleetp2p-cli"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(self.timeout)
            conn.request(method, path, body=body, headers=headers)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise self._unreachable(e) from None

    def _unreachable(self, error: BaseException) -> FleetError:
        if isinstance(error, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(error, (socket.timeout, TimeoutError)):
            why = "timed out"
        elif isinstance(error, socket.gaierror):
            why = f"cannot resolve {self.host}"
        else:
            why = str(error) or type(error).__name__
        return AgentUnreachable(f"cannot reach the agent at {self.url}: {why} (is `fleetp2p agent` "
                                "running? --agent URL selects another one)")

    def _raise_for(self, resp: http.client.HTTPResponse) -> None:
        raw = resp.read()
        try:
            message = json.loads(raw).get("error")
        except (ValueError, AttributeError):
            message = None
        if resp.status == 404 and message is None:
            message = (f"{self.url} has no admin API (is it a fleetp2p agent of this version?)")
        message = message or f"agent answered HTTP {resp.status}"
        if resp.status == 400:
            raise UsageError(message)
        raise AgentError(message, resp.status)


def _lines(resp: http.client.HTTPResponse,
           on_error: Callable[[BaseException], FleetError]) -> Iterator[bytes]:
    while True:
        try:
            line = resp.readline()
        except (OSError, http.client.HTTPException) as e:
            raise on_error(e) from None
        if not line:
            return
        if line.strip():
            yield line


def add_agent_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agent", metavar="URL", default=DEFAULT_AGENT_URL,
                        help=f"the agent's admin URL (default {DEFAULT_AGENT_URL})")


def run_command(args: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    """Usage errors found after argparse (bad reference, bad URL) exit 2 with
    one line, like argparse's own; every other FleetError goes up to main (1)."""
    try:
        return command(args)
    except UsageError as e:
        if getattr(args, "debug", False):
            raise
        print(f"fleetp2p: {e}", file=sys.stderr)
        return 2
