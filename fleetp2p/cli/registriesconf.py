"""The doctor's look at containers' registries.conf (podman, skopeo, CRI-O).

Those clients never say which registry they want, so a mirror entry pointing
at the agent must name it in the location's path (`127.0.0.1:5050/ghcr.io`);
a bare location only works for the agent's default registry. A wrong entry
does not fail loudly: the client quietly falls back to the registry itself,
and the fleet pays upstream for every pull.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from fleetp2p.cli.checks import Check, fail, ok, same_endpoint
from fleetp2p.oci.reference import DOCKER_HUB_NAMES

DEFAULT_REGISTRIES_CONF = "/etc/containers/registries.conf"


def load_registries(path: Path) -> dict[str, dict[str, Any]]:
    """prefix → its [[registry]] table: the file, then its drop-ins
    (`<file>.d/*.conf` in name order), where a later table for the same prefix
    replaces an earlier one, as containers/image reads them."""
    files = [path] if path.is_file() else []
    dropins = path.with_name(path.name + ".d")
    if dropins.is_dir():
        files += sorted(dropins.glob("*.conf"))
    tables: dict[str, dict[str, Any]] = {}
    for file in files:
        with open(file, "rb") as f:
            for table in tomllib.load(f).get("registry") or []:
                if isinstance(table, dict):
                    prefix = table.get("prefix") or table.get("location") or ""
                    tables[prefix] = {**table, "_file": str(file)}
    return tables


def check_registries_conf(path: str | None, agent_url: str, default_registry: str,
                          registry_in_path: bool) -> list[Check]:
    """One check per [[registry]] whose mirrors include the agent. Nothing when
    the default file does not use the agent (this host has no such clients);
    a failure when a file given explicitly does not."""
    conf = Path(path or DEFAULT_REGISTRIES_CONF)
    if path is not None and not conf.is_file():
        return [fail("registries.conf", f"{conf} does not exist",
                     "pass the registries.conf podman, skopeo or CRI-O read")]
    try:
        tables = load_registries(conf)
    except (OSError, tomllib.TOMLDecodeError) as e:
        return [fail("registries.conf", f"cannot read {conf}: {e}", f"fix the TOML syntax of {conf}")]
    agent_netloc = agent_url.split("://", 1)[-1].rstrip("/")
    results = []
    for prefix, table in tables.items():
        for mirror in table.get("mirror") or []:
            if not isinstance(mirror, dict):
                continue
            netloc, _, mirror_path = str(mirror.get("location", "")).partition("/")
            scheme = "http" if mirror.get("insecure") else "https"
            if netloc and same_endpoint(f"{scheme}://{netloc}", agent_url):
                results.append(_check_entry(prefix, table, mirror_path, agent_netloc,
                                            default_registry, registry_in_path))
            elif netloc and same_endpoint(f"http://{netloc}", agent_url):
                results.append(fail(f"registries.conf {prefix}",
                                    f"{table['_file']}: the mirror {netloc} is the agent, over https",
                                    f"add insecure = true to that [[registry.mirror]]: the agent "
                                    f"speaks plain HTTP on {agent_netloc}"))
    if not results and path is not None:
        results.append(fail("registries.conf", f"no [[registry.mirror]] in {conf} points at the agent",
                            f"add to the [[registry]] of each registry: [[registry.mirror]] location = "
                            f"\"{agent_netloc}/<registry>\", insecure = true"))
    return results


def _check_entry(prefix: str, table: dict[str, Any], mirror_path: str, agent_netloc: str,
                 default_registry: str, registry_in_path: bool) -> Check:
    name, where = f"registries.conf {prefix}", table["_file"]
    upstream = str(table.get("location") or prefix)
    host = upstream.split("/", 1)[0]
    if "*" in prefix:
        return fail(name, f"{where}: a wildcard prefix goes to the agent, which cannot tell its "
                          "registries apart", "write one [[registry]] per registry instead")
    if not mirror_path:
        if _same_registry(host, default_registry) or _same_registry(prefix.split("/", 1)[0], default_registry):
            return ok(name, f"{where}: mirrored through {agent_netloc} (the agent's default registry)")
        if ":" in host:
            return fail(name, f"{where}: {host} goes to the agent, which fetches from "
                              f"{default_registry}; a registry with a port cannot be named in the "
                              "mirror's path", "give it a name without a port in the agent's "
                              "[[registries]] and in this entry, or make it the default_registry")
        return fail(name, f"{where}: the agent would fetch {prefix} from its default registry "
                          f"{default_registry}", f"set the mirror's location = \"{agent_netloc}/{upstream}\"")
    if not registry_in_path:
        return fail(name, f"{where}: the mirror names {mirror_path}, but the agent has "
                          "registry_in_path = false", "set registry_in_path = true in the agent config")
    if mirror_path not in (upstream, prefix):
        return fail(name, f"{where}: the mirror names {mirror_path}, the entry is for {upstream}",
                    f"set the mirror's location = \"{agent_netloc}/{upstream}\"")
    return ok(name, f"{where}: mirrored through {agent_netloc}/{mirror_path}")


def _same_registry(a: str, b: str) -> bool:
    return a == b or (a in DOCKER_HUB_NAMES and b in DOCKER_HUB_NAMES)
