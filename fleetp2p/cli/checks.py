"""The checks `fleetp2p doctor` runs, one function each, every one returning a `Check`.

A check never raises: whatever goes wrong becomes a failed check whose `fix`
tells the operator, in one line, what to change. The functions take plain
values (paths, URLs, config objects) so tests can call them one by one
against real servers.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import ssl
import tempfile
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from fleetp2p import config as config_mod
from fleetp2p.cli.progress import human_bytes
from fleetp2p.config import Config, Registry
from fleetp2p.errors import FleetError
from fleetp2p.upstream.auth import parse_challenge

PASS, FAIL, SKIP = "pass", "fail", "skip"
MIN_FREE_BYTES = 1 << 30  # below this a single large layer no longer fits
PROBE_TIMEOUT = 5.0
DEFAULT_CONFIG = "/etc/fleetp2p/agent.toml"
DEFAULT_CONTAINERD_CONFIG = "/etc/containerd/config.toml"
DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
# containerd 1.x config v2, and containerd 2.x config v3
_CONFIG_PATH_TABLES = (("io.containerd.grpc.v1.cri", "registry"), ("io.containerd.cri.v1.images", "registry"))
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ok(name: str, detail: str) -> Check:
    return Check(name, PASS, detail)


def fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, FAIL, detail, fix)


def skip(name: str, why: str) -> Check:
    return Check(name, SKIP, f"skipped: {why}")


# Agent side ---------------------------------------------------------------------

def check_config(path: str | None) -> tuple[Check, Config | None]:
    """Load the agent config as the agent would (same validation, same messages)."""
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    try:
        cfg = config_mod.load(path)
    except FleetError as e:
        return fail("config", str(e), f"correct that key in {path or 'the config'} "
                    "(`python -m fleetp2p.config` lists every key)"), None
    where = path or "no config file, defaults"
    return ok("config", f"{where}: valid; {len(cfg.registries)} registries, default "
              f"{cfg.default_registry}"), cfg


def check_data_dir(data_dir: str, min_free: int = MIN_FREE_BYTES) -> Check:
    """Writable (the agent creates it if missing, so its nearest parent must be) and with room."""
    target = Path(data_dir)
    probe_dir = target
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".doctor-"):
            pass
    except OSError as e:
        return fail("data dir", f"{probe_dir} is not writable: {e.strerror or e}",
                    f"chown/chmod {probe_dir} for the agent's user, or set data_dir elsewhere")
    free = shutil.disk_usage(probe_dir).free
    if free < min_free:
        return fail("data dir", f"{data_dir}: only {human_bytes(free)} free",
                    f"free space on that filesystem (need ≥ {human_bytes(min_free)}) or move data_dir")
    state = "" if target.exists() else " (will be created)"
    return ok("data dir", f"{data_dir}{state}: writable, {human_bytes(free)} free")


def check_agent(url: str) -> tuple[Check, dict[str, Any] | None]:
    from fleetp2p.cli.agentclient import AgentClient

    try:
        status = AgentClient(url, timeout=PROBE_TIMEOUT).status()
    except FleetError as e:
        return fail("agent", str(e).split(" (is ", 1)[0],
                    "start it: fleetp2p agent --config FILE (or point --agent at it)"), None
    return ok("agent", f"{url}: fleetp2p {status.get('version')} answering"), status


def check_store(status: dict[str, Any] | None, cfg: Config | None) -> Check:
    """Usage against the high watermark: from the agent if it answers, else from the disk."""
    if status is not None:
        store = status.get("store") or {}
        used, high, pinned = store.get("bytes", 0), store.get("high_bytes", 0), store.get("pinned_bytes", 0)
    elif cfg is not None:
        try:
            limit = cfg.store_limit_bytes()
        except FleetError as e:
            return fail("store", str(e), "set store_max_size to a size (50GiB) or a percentage")
        used = _tree_bytes(Path(cfg.data_dir) / "blobs")
        high, pinned = int(limit * cfg.store_high_watermark), None
    else:
        return skip("store", "no valid config and no agent")
    if used > high:
        pinned_text = f", {human_bytes(pinned)} pinned" if pinned is not None else ""
        return fail("store", f"{human_bytes(used)} used, above the high watermark of "
                    f"{human_bytes(high)}{pinned_text}", "unpin old seeds (fleetp2p seed --unpin "
                    "REF), raise store_max_size, or give the store more disk")
    return ok("store", f"{human_bytes(used)} used, high watermark {human_bytes(high)}")


def _tree_bytes(root: Path) -> int:
    """Bytes of every file below root (whatever the store's layout inside it)."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total


# Swarm side ---------------------------------------------------------------------

def check_tracker(url: str | None, token: str | None) -> Check:
    """`/healthz` is open (reachable?), `/v1/health` needs the bearer token (authenticated?)."""
    if not url:
        return skip("tracker", "no tracker configured")
    try:
        status, _, _ = http_get(url.rstrip("/") + "/healthz")
    except OSError as e:
        return fail("tracker", f"cannot reach {url}: {_why(e)}",
                    "start the tracker or fix tracker_url; check firewalls between node and tracker")
    if status != 200:
        return fail("tracker", f"{url}/healthz answered {status}", "check tracker_url: is it a "
                    "fleetp2p tracker (standalone, or /tracker/ of an agent)?")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        status, _, _ = http_get(url.rstrip("/") + "/v1/health", headers)
    except OSError as e:
        return fail("tracker", f"{url}/v1/health: {_why(e)}", "check the tracker's logs")
    if status == 401:
        return fail("tracker", f"{url} refused the {'token' if token else 'request without a token'}",
                    "set tracker_token to the tracker's --token")
    if status != 200:
        return fail("tracker", f"{url}/v1/health answered {status}", "check the tracker's logs")
    return ok("tracker", f"{url}: reachable, {'authenticated' if token else 'no token needed'}")


def check_peer_port(listen: str | None) -> Check:
    """The BitTorrent listener accepts connections (from this node; the tracker
    reports whether other nodes got through)."""
    if not listen:
        return skip("peer port", "no tracker configured, so no peer listener")
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT):
            pass
    except (OSError, ValueError) as e:
        return fail("peer port", f"nothing accepts connections on {listen}: {_why(e)}",
                    "start the agent with the swarm enabled and open that TCP port in the firewall")
    return ok("peer port", f"{listen} accepts connections")


# containerd --------------------------------------------------------------------

def check_containerd_config(path: str | None) -> tuple[Check, str | None]:
    """containerd reads mirrors from hosts.toml only when `config_path` is set."""
    explicit = path is not None
    path = path or DEFAULT_CONTAINERD_CONFIG
    if not os.path.exists(path):
        if not explicit and shutil.which("containerd") is None:
            return skip("containerd config", "containerd is not installed"), None
        return fail("containerd config", f"{path} does not exist", _config_path_fix(path)), None
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        return fail("containerd config", f"cannot read {path}: {e}", f"fix the TOML syntax of {path}"), None
    plugins = data.get("plugins") or {}
    for plugin, table in _CONFIG_PATH_TABLES:
        value = ((plugins.get(plugin) or {}).get(table) or {}).get("config_path")
        if isinstance(value, str) and value:
            return ok("containerd config", f"{path}: config_path = {value}"), value
    return fail("containerd config", f"{path} sets no registry config_path",
                _config_path_fix(path)), None


def _config_path_fix(path: str) -> str:
    return (f"add to {path}: [plugins.\"io.containerd.grpc.v1.cri\".registry] config_path = "
            f"\"{DEFAULT_HOSTS_DIR}\" (containerd 2: io.containerd.cri.v1.images), then restart containerd")


def check_hosts_toml(hosts_dir: str, registry: str, agent_url: str) -> Check:
    """`hosts_dir/<registry>/hosts.toml` (or `_default`) must list the agent as a pull host."""
    name = f"hosts.toml {registry}"
    candidates = [Path(hosts_dir) / _hosts_dir_name(registry) / "hosts.toml",
                  Path(hosts_dir) / "_default" / "hosts.toml"]
    fix = (f"write {candidates[0]}: [host.\"{agent_url}\"] capabilities = [\"pull\", \"resolve\"]")
    # containerd reads the registry's own file if there is one, _default only otherwise.
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        return fail(name, f"no {candidates[0]} and no _default/hosts.toml", fix)
    try:
        with open(path, "rb") as f:
            hosts = tomllib.load(f).get("host") or {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        return fail(name, f"cannot read {path}: {e}", f"fix the TOML syntax of {path}")
    for url, settings in hosts.items():
        if not same_endpoint(url, agent_url):
            continue
        caps = settings.get("capabilities", ["pull", "resolve", "push"]) if isinstance(settings, dict) else []
        if "pull" not in caps:
            return fail(name, f"{path} lists the agent without the pull capability",
                        f"set capabilities = [\"pull\", \"resolve\"] for {url} in {path}")
        return ok(name, f"{path} mirrors through {url}")
    return fail(name, f"{path} does not name the agent {agent_url}",
                f"add to {path}: [host.\"{agent_url}\"] capabilities = [\"pull\", \"resolve\"]")


def _hosts_dir_name(registry: str) -> str:
    return "docker.io" if registry in ("index.docker.io", "registry-1.docker.io") else registry


def same_endpoint(a: str, b: str) -> bool:
    """Same scheme and port, and the same host (any loopback name counts as one)."""
    pa, pb = urlsplit(a if "://" in a else f"https://{a}"), urlsplit(b)
    ha, hb = (pa.hostname or "").lower(), (pb.hostname or "").lower()
    same_host = ha == hb or (ha in _LOOPBACK_NAMES and hb in _LOOPBACK_NAMES)
    default = {"http": 80, "https": 443}
    return pa.scheme == pb.scheme and same_host and \
        (pa.port or default.get(pa.scheme)) == (pb.port or default.get(pb.scheme))


# Upstream ----------------------------------------------------------------------

def check_upstream(registry: Registry) -> Check:
    """`GET /v2/` the way the agent authenticates: anonymous, then the
    challenge's Bearer token flow or Basic auth with the configured credentials."""
    name = f"upstream {registry.name}"
    fix_creds = (f"set username/password or docker_config for {registry.name} in [[registries]] "
                 "of the agent config")
    base = registry.url.rstrip("/")
    try:
        credentials = registry.credentials()
        status, headers, _ = http_get(f"{base}/v2/")
        if status == 401:
            challenge = parse_challenge(headers.get("www-authenticate", ""))
            if challenge is None:
                return fail(name, f"{base}/v2/ answered 401 without a challenge", fix_creds)
            if challenge.scheme == "basic":
                if not credentials:
                    return fail(name, f"{base} requires a password, none is configured", fix_creds)
                auth = _basic(credentials)
            elif challenge.scheme == "bearer":
                auth = _bearer_token(challenge.params, credentials)
                if auth is None:
                    return fail(name, f"token server {challenge.params.get('realm')} refused "
                                f"{'the credentials' if credentials else 'anonymous access'}",
                                fix_creds)
            else:
                return fail(name, f"{base} wants unsupported auth {challenge.scheme!r}", fix_creds)
            status, _, _ = http_get(f"{base}/v2/", {"Authorization": auth})
            if status in (401, 403):
                return fail(name, f"{base} rejected the credentials ({status})", fix_creds)
            mode = "authenticated" if credentials else "anonymous token"
        else:
            mode = "anonymous"
    except FleetError as e:
        return fail(name, str(e), fix_creds)
    except OSError as e:
        return fail(name, f"cannot reach {base}: {_why(e)}",
                    f"check url of [[registries]] {registry.name}, DNS, proxy and firewall")
    if status != 200:
        return fail(name, f"{base}/v2/ answered {status}", "the registry is unhealthy or the url "
                    "is not a registry's base URL; check [[registries]] url")
    return ok(name, f"{base}: reachable, {mode}")


def _bearer_token(params: dict[str, str], credentials: tuple[str, str] | None) -> str | None:
    realm = params.get("realm", "")
    query = {k: v for k, v in (("service", params.get("service")), ("scope", params.get("scope"))) if v}
    headers = {"Authorization": _basic(credentials)} if credentials else {}
    status, _, body = http_get(f"{realm}?{urlencode(query)}" if query else realm, headers)
    if status != 200:
        return None
    try:
        data = json.loads(body)
        token = data.get("token") or data.get("access_token")
    except (ValueError, AttributeError):
        return None
    return f"Bearer {token}" if isinstance(token, str) and token else None


def _basic(credentials: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()


def http_get(url: str, headers: dict[str, str] | None = None,
             timeout: float = PROBE_TIMEOUT) -> tuple[int, dict[str, str], bytes]:
    """One GET without following redirects; header names lowercased. Raises OSError."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OSError(f"not an http(s) URL: {url}")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    kwargs: dict[str, Any] = {"context": ssl.create_default_context()} if parts.scheme == "https" else {}
    conn = cls(parts.hostname, parts.port, timeout=timeout, **kwargs)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", target, headers={"User-Agent": "fleetp2p-doctor", **(headers or {})})
        resp = conn.getresponse()
        body = resp.read(1 << 20)
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    except http.client.HTTPException as e:
        raise OSError(f"bad HTTP reply: {e or type(e).__name__}") from None
    finally:
        conn.close()


def _why(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, socket.gaierror):
        return "name does not resolve"
    return str(error) or type(error).__name__
