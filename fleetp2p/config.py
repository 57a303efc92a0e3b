"""Agent configuration: one TOML file, every key with a default, every key a flag.

The `Config` dataclass below is the reference for every key; the README's
configuration table is generated from the same field metadata
(`python -m fleetp2p.config` prints it), so docs and code cannot drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetp2p.errors import ConfigError
from fleetp2p.oci.reference import DOCKER_HUB_NAMES, validate_registry

if TYPE_CHECKING:
    from fleetp2p.store.geometry import Geometry

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
               "tb": 1000**4, "tib": 1024**4}


def _default_data_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/fleetp2p"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "fleetp2p")


def key(default: Any, help: str, **extra: Any) -> Any:
    """A config field: its default and the one-line help used by --help and the README."""
    factory = extra.pop("factory", None)
    metadata = {"help": help, **extra}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Registry:
    """One upstream registry, as `[[registries]]` in the config file."""

    name: str
    url: str
    username: str | None = None
    password: str | None = None
    docker_config: str | None = None

    def credentials(self) -> tuple[str, str] | None:
        if self.username is not None:
            return self.username, self.password or ""
        if self.docker_config:
            return _docker_config_credentials(self.docker_config, self.name)
        return None


@dataclass
class Config:
    listen: str = key("127.0.0.1:5050", "HOST:PORT of the OCI mirror, /metrics and the admin API")
    data_dir: str = key(None, "where blobs, manifests and tags are stored",
                        factory=_default_data_dir)
    default_registry: str = key(
        "", "registry used for requests without ?ns= (skopeo, podman); default: the first "
        "[[registries]] entry, else docker.io")
    registry_in_path: bool = key(
        True, "without ?ns=, a repository whose first component is a host (a dot, a port or "
        "localhost: /v2/ghcr.io/owner/app/...) is fetched from that registry, so registries.conf "
        "can mirror several registries (location = \"127.0.0.1:5050/ghcr.io\"); false: it is a "
        "repository of default_registry")
    tag_ttl: float = key(60.0, "seconds a tag → digest answer is trusted before asking upstream again")
    store_max_size: str = key("80%", "store size limit: bytes with a unit (50GiB) or a percentage "
                              "of the data_dir filesystem")
    store_high_watermark: float = key(0.95, "fraction of store_max_size at which eviction starts")
    store_low_watermark: float = key(0.85, "fraction of store_max_size eviction brings usage down to")
    upstream_connect_timeout: float = key(10.0, "seconds to connect to an upstream registry")
    upstream_stall_timeout: float = key(
        20.0, "seconds without a byte from upstream before a stream is abandoned and resumed with Range")
    upstream_retries: int = key(4, "attempts per upstream request on 429, 5xx and connection errors")
    upstream_backoff: float = key(0.5, "first retry delay in seconds (doubles each attempt, with jitter)")
    segment_size: str = key("32MiB", "blob segment (one torrent each; a power of two); huge "
                            "blobs get larger ones (at most 256 segments)")
    adaptive_segments: bool = key(False, "blobs under 16 segments get smaller ones (down to 4MiB), "
                                  "so a cold herd swarms a segment while others are still fetched")
    piece_size: str = key("128KiB", "piece size within a segment (a power of two, >= 16KiB)")
    max_manifest_size: str = key("4MiB", "largest manifest accepted from upstream")
    log_level: str = key("info", "debug, info, warning or error")
    event_loop: str = key("asyncio", "asyncio (zero-copy sendfile for cache hits) or uvloop "
                          "(uvloop's transports copy file bodies; see bench/hot_serve.py)")
    admin_allow_remote: bool = key(
        False, "answer the admin API (/_fleetp2p/v1/: seed, pull, status) for non-loopback clients "
        "too; it has no authentication, so keep it false unless a firewall guards the listener")
    tracker: str = key("embedded", '"embedded" (run a tracker in this agent on tracker_listen), a '
                       'tracker URL (http://host:port), or "none" (no peer-to-peer)')
    tracker_listen: str = key("127.0.0.1:5051", "HOST:PORT of the embedded tracker")
    tracker_token: str = key("", "shared secret sent to (and required by) the tracker; empty: none")
    tracker_redis: str = key("", "Redis URL for the embedded tracker's state (empty: in memory)")
    tracker_lease_limit: int = key(1, "embedded tracker: segments of one cold blob fetched from "
                                   "upstream at once, fleet-wide (0: no limit)")
    peer_listen: str = key("127.0.0.1:6881", "HOST:PORT for BitTorrent peers; a fleet sets "
                           "0.0.0.0:6881 (or the node's address)")
    advertise_addr: str = key("", "address other nodes dial for this node's peer port; default: "
                              "the peer_listen host, else the first non-loopback address")
    peer_http_listen: str = key("", "HOST:PORT where other nodes read byte ranges for lazy pulls; "
                                "default: the peer_listen host, port + 1")
    lazy_prefetch: bool = key(True, "fetch a lazy layer's prioritized files (.prefetch.landmark) "
                              "in the background after its first read")
    zone: str = key("", "topology label: peers in the same zone are preferred")
    rack: str = key("", "topology label: peers in the same rack are preferred")
    swarm_min_size: str = key("1", "smaller blobs always come straight from upstream (the "
                              "default swarms every non-empty blob: a fleet fetches even its "
                              "config blobs once)")
    peer_stall_timeout: float = key(10.0, "seconds without progress from peers before a segment's "
                                    "missing pieces are fetched from upstream")
    release_page_cache: bool = key(True, "a few seconds after a fetched segment is verified and "
                                   "streamed, write it back and drop it from the page cache "
                                   "(peers then read it from disk)")
    registries: list[Registry] = key(None, "upstream registries ([[registries]] tables: name, url, "
                                     "username, password, docker_config)", factory=list)

    # Derived helpers -----------------------------------------------------

    @property
    def listen_host(self) -> str:
        return _split_hostport(self.listen, "listen")[0]

    @property
    def listen_port(self) -> int:
        return _split_hostport(self.listen, "listen")[1]

    def registry(self, name: str) -> Registry:
        """The upstream for a registry host as clients name it."""
        for registry in self.registries:
            if registry.name == name:
                return registry
        if name in DOCKER_HUB_NAMES:
            return Registry(name=name, url="https://registry-1.docker.io")
        return Registry(name=name, url=f"https://{name}")

    def _check_ports_distinct(self) -> None:
        """Two listeners on one port fail at startup; say which keys clash now."""
        ports: dict[int, str] = {}
        listeners = [("listen", self.listen_port)]
        if self.tracker != "none":
            listeners += [("peer_listen", _split_hostport(self.peer_listen, "peer_listen")[1]),
                          ("peer_http_listen", self.peer_http_hostport[1])]
        if self.tracker == "embedded":
            listeners.append(("tracker_listen", _split_hostport(self.tracker_listen, "tracker_listen")[1]))
        for name, port in listeners:
            if port and port in ports:
                raise ConfigError(f"{name}: port {port} is also used by {ports[port]}"
                                  + (" (peer_http_listen defaults to peer_listen's port + 1)"
                                     if "peer_http_listen" in (name, ports[port]) else ""))
            ports[port] = name

    @property
    def tracker_url(self) -> str | None:
        if self.tracker == "none":
            return None
        if self.tracker == "embedded":
            host, port = _split_hostport(self.tracker_listen, "tracker_listen")
            host = "127.0.0.1" if host in ("0.0.0.0", "") else host
            return f"http://{host}:{port}"
        return self.tracker.rstrip("/")

    @property
    def peer_http_hostport(self) -> tuple[str, int]:
        if self.peer_http_listen:
            return _split_hostport(self.peer_http_listen, "peer_http_listen")
        host, port = _split_hostport(self.peer_listen, "peer_listen")
        return host, port + 1 if port else 0

    def labels(self) -> dict[str, str]:
        return {k: v for k, v in (("zone", self.zone), ("rack", self.rack)) if v}

    def store_limit_bytes(self) -> int:
        return parse_size(self.store_max_size, "store_max_size", base_path=self.data_dir)

    def geometry(self, size: int) -> "Geometry":
        from fleetp2p.store.geometry import Geometry

        return Geometry.for_size(size, parse_size(self.segment_size, "segment_size"),
                                 parse_size(self.piece_size, "piece_size"),
                                 adaptive=self.adaptive_segments)

    def manifest_limit_bytes(self) -> int:
        return parse_size(self.max_manifest_size, "max_manifest_size")

    def validate(self) -> "Config":
        _split_hostport(self.listen, "listen")
        if not self.data_dir:
            raise ConfigError("data_dir: must not be empty")
        for name in ("tag_ttl", "upstream_connect_timeout", "upstream_stall_timeout", "upstream_backoff"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0")
        if self.upstream_retries < 1:
            raise ConfigError("upstream_retries: must be >= 1")
        if not 0 < self.store_low_watermark < self.store_high_watermark <= 1:
            raise ConfigError("store_low_watermark/store_high_watermark: need 0 < low < high <= 1")
        parse_size(self.store_max_size, "store_max_size", base_path=None)
        self.manifest_limit_bytes()
        for name in ("segment_size", "piece_size"):
            value = parse_size(getattr(self, name), name)
            if value < 16 * 1024 or value & (value - 1):
                raise ConfigError(f"{name}: must be a power of two of at least 16KiB, got "
                                  f"{getattr(self, name)!r}")
        if parse_size(self.piece_size, "piece_size") > parse_size(self.segment_size, "segment_size"):
            raise ConfigError("piece_size: must not exceed segment_size")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level: unknown level {self.log_level!r}")
        if self.tracker not in ("embedded", "none") and \
                not re.match(r"^https?://[^/\s]+(/.*)?$", self.tracker):
            raise ConfigError(f'tracker: expected "embedded", "none" or http(s)://host:port, got '
                              f"{self.tracker!r}")
        _split_hostport(self.tracker_listen, "tracker_listen")
        _split_hostport(self.peer_listen, "peer_listen")
        if self.peer_http_listen:
            _split_hostport(self.peer_http_listen, "peer_http_listen")
        parse_size(self.swarm_min_size, "swarm_min_size")
        if self.peer_stall_timeout <= 0:
            raise ConfigError("peer_stall_timeout: must be > 0")
        if self.tracker_lease_limit < 0:
            raise ConfigError("tracker_lease_limit: must be >= 0 (0: no limit)")
        self._check_ports_distinct()
        if self.event_loop not in ("asyncio", "uvloop"):
            raise ConfigError(f"event_loop: expected asyncio or uvloop, got {self.event_loop!r}")
        seen = set()
        for i, registry in enumerate(self.registries):
            where = f"registries[{i}]"
            try:
                validate_registry(registry.name)
            except Exception:
                raise ConfigError(f"{where}.name: invalid registry host {registry.name!r}") from None
            if registry.name in seen:
                raise ConfigError(f"{where}.name: {registry.name!r} listed twice")
            seen.add(registry.name)
            if not re.match(r"^https?://[^/\s]+/?$", registry.url):
                raise ConfigError(f"{where}.url: expected http(s)://host[:port], got {registry.url!r}")
            registry.url = registry.url.rstrip("/")
            if registry.docker_config and not os.path.exists(registry.docker_config):
                raise ConfigError(f"{where}.docker_config: no such file {registry.docker_config!r}")
        if not self.default_registry:
            self.default_registry = self.registries[0].name if self.registries else "docker.io"
        try:
            validate_registry(self.default_registry)
        except Exception:
            raise ConfigError(f"default_registry: invalid registry host {self.default_registry!r}") from None
        return self


def _split_hostport(value: str, name: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def parse_size(value: str | int, name: str, base_path: str | None = None) -> int:
    """`50GiB`, `1000000`, or `80%` (of the filesystem holding base_path)."""
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise ConfigError(f"{name}: invalid percentage {value!r}") from None
        if not 0 < percent <= 100:
            raise ConfigError(f"{name}: percentage must be in (0, 100], got {value!r}")
        if base_path is None:
            return 0
        probe = Path(base_path)
        while not probe.exists():
            probe = probe.parent
        return int(shutil.disk_usage(probe).total * percent / 100)
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)", text)
    if not match or match.group(2) not in _SIZE_UNITS:
        raise ConfigError(f"{name}: invalid size {value!r} (examples: 500MiB, 50GiB, 80%)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _docker_config_credentials(path: str, registry: str) -> tuple[str, str] | None:
    try:
        with open(path, encoding="utf-8") as f:
            auths = json.load(f).get("auths", {})
    except (OSError, ValueError) as e:
        raise ConfigError(f"docker_config: cannot read {path}: {e}") from None
    import base64

    candidates = [registry, f"https://{registry}", f"http://{registry}"]
    if registry in DOCKER_HUB_NAMES:
        candidates += ["https://index.docker.io/v1/", "index.docker.io", "docker.io"]
    for candidate in candidates:
        entry = auths.get(candidate)
        if not entry:
            continue
        if entry.get("username"):
            return entry["username"], entry.get("password", "")
        if entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return user, password
    return None


# Loading -----------------------------------------------------------------

_SCALAR_FIELDS = [f for f in dataclasses.fields(Config) if f.name != "registries"]


def load(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read the TOML file (if any), apply flag overrides, validate."""
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config: no such file {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(data).validate()


def from_dict(data: dict[str, Any]) -> Config:
    known = {f.name: f for f in dataclasses.fields(Config)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = known.get(name)
        if f is None:
            raise ConfigError(f"{name}: unknown configuration key")
        if name == "registries":
            kwargs[name] = _registries(value)
        else:
            kwargs[name] = _coerce(name, value, f.type)
    return Config(**kwargs)


def _registries(value: Any) -> list[Registry]:
    if not isinstance(value, list):
        raise ConfigError("registries: expected a list of [[registries]] tables")
    result = []
    allowed = {f.name for f in dataclasses.fields(Registry)}
    for i, entry in enumerate(value):
        if isinstance(entry, str):  # "name=url" from the --registry flag
            name, sep, url = entry.partition("=")
            entry = {"name": name, "url": url if sep else f"https://{name}"}
        if not isinstance(entry, dict):
            raise ConfigError(f"registries[{i}]: expected a table")
        for k, v in entry.items():
            if k not in allowed:
                raise ConfigError(f"registries[{i}].{k}: unknown key")
            if not isinstance(v, str):
                raise ConfigError(f"registries[{i}].{k}: expected a string")
        for required in ("name", "url"):
            if required not in entry:
                raise ConfigError(f"registries[{i}].{required}: missing")
        result.append(Registry(**entry))
    return result


def _coerce(name: str, value: Any, type_name: Any) -> Any:
    type_text = str(type_name)
    try:
        if type_text == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if type_text == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if type_text == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if type_text.startswith("str"):
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {type_text.split(' |')[0]}, got {value!r}") from None
    return value


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Every config key becomes a flag (`store_max_size` → `--store-max-size`)."""
    for f in _SCALAR_FIELDS:
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            metavar=f.name.upper(), help=f.metadata["help"])
    parser.add_argument("--registry", dest="registries", action="append", default=None,
                        metavar="NAME=URL", help="add an upstream registry (repeatable)")


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = [f.name for f in _SCALAR_FIELDS] + ["registries"]
    return {name: getattr(args, name, None) for name in names}


def reference_table() -> str:
    """Markdown table of every key, for the README."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name == "data_dir":
            default = "/var/lib/fleetp2p (root) or ~/.local/share/fleetp2p"
        elif f.name == "registries":
            default = "[]"
        rows.append(f"| `{f.name}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_table())
