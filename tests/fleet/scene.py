"""One scenario on the fleet network: the trackers, Redis and agents it starts,
torn down together (and their logs shown when it went wrong).

The network and the upstream registry outlive scenarios (they hold no state a
scenario depends on besides pushed blobs); everything with fetch state —
agents' stores, tracker records — is new in every scenario, so every blob is
cold again.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any, Sequence

from .agents import FleetAgent, Snapshot, remove_agent_dirs, start_agents
from .netns import Host, Network
from .services import Redis, Tracker, UpstreamRegistry


class Scene:
    def __init__(self, net: Network, upstream: UpstreamRegistry, workdir: Path) -> None:
        self.net = net
        self.upstream = upstream
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.agents: list[FleetAgent] = []
        self.trackers: list[Tracker] = []
        self.redises: list[Redis] = []
        self._rates: dict[str, str] = {}
        self.log_mark = upstream.access_log.mark()

    @property
    def nodes(self) -> list[Host]:
        """Every host named node<N>, in order."""
        return sorted((h for n, h in self.net.hosts.items() if n.startswith("node")),
                      key=lambda h: int(h.name[4:]))

    def tracker(self, port: int = 7000, **kw: Any) -> Tracker:
        t = Tracker(self.net["tracker"], self.workdir, port, **kw).start()
        self.trackers.append(t)
        return t

    def redis(self) -> Redis:
        r = Redis(self.net["tracker"], self.workdir / "redis").start()
        self.redises.append(r)
        return r

    def start_agents(self, hosts: Sequence[Host], tracker: str, **settings: Any) -> list[FleetAgent]:
        started = start_agents(hosts, self.workdir, self.upstream, tracker=tracker, **settings)
        self.agents += started
        return started

    def set_rate(self, hosts: Sequence[Host], rate: str) -> None:
        """Reshape links for this scenario only (restored by `close`)."""
        for h in hosts:
            self._rates.setdefault(h.name, h.rate)
            h.set_rate(rate)

    def snapshots(self, agents: Sequence[FleetAgent]) -> list[Snapshot]:
        return [Snapshot.of(a) for a in agents]

    def report(self) -> str:
        """Logs worth reading after a failure: each agent's tail, the trackers', the
        registry's access log during the scenario."""
        parts = []
        for a in self.agents:
            parts.append(f"===== agent on {a.host.name} ({a.host.addr}) =====\n{a.log(12000)}")
        for t in self.trackers:
            parts.append(f"===== tracker {t.url} =====\n{t.log()}")
        lines = self.upstream.access_log.path.read_text(errors="replace").splitlines()
        parts.append("===== registry access log during the scenario =====\n"
                     + "\n".join(lines[self.log_mark:][-80:]))
        return "\n".join(parts)

    def close(self) -> None:
        stoppers = [*(a.stop for a in self.agents), *(t.stop for t in self.trackers),
                    *(r.stop for r in self.redises)]
        threads = [threading.Thread(target=stop) for stop in stoppers]  # SIGTERM waits overlap
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name, rate in self._rates.items():
            self.net[name].set_rate(rate)
        remove_agent_dirs(self.agents)
        shutil.rmtree(self.workdir, ignore_errors=True)
