"""The agent's one libtorrent session.

Settings that matter for a fleet (each measured, see shared/TESTING.md):
uTP off (slow), DHT/LSD/UPnP/NAT-PMP off (peers come from our tracker),
several connections per IP allowed, redundant connections kept (a finished
segment still serves late requests), no auto-management (every torrent
active), unlimited unchoke slots, large send buffers.

Alerts reach asyncio through libtorrent's alert fd and `loop.add_reader`:
the loop never blocks on libtorrent, and nothing else in the agent touches
the session.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import libtorrent as lt

from fleetp2p.metrics import Metrics
from fleetp2p.swarm.events import (HashFailed, PieceFinished, SegmentChecked, SegmentFinished,
                                   SegmentKey, SwarmEvent, TorrentFailed)
from fleetp2p.swarm.metainfo import torrent_info

log = logging.getLogger(__name__)

STATS_INTERVAL = 5.0
MIN_RATE = 16 * 1024  # bytes/s: one block per second, so a capped torrent still moves
Listener = Callable[[SwarmEvent], None]


def session_settings(listen: str) -> dict:
    return {
        "listen_interfaces": listen,
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
        "enable_incoming_utp": False, "enable_outgoing_utp": False,
        "allow_multiple_connections_per_ip": True,
        "close_redundant_connections": False,
        "unchoke_slots_limit": -1,
        "active_downloads": -1, "active_seeds": -1, "active_limit": -1, "active_checking": -1,
        "send_buffer_watermark": 8 * 1024 * 1024,
        "max_out_request_queue": 1500,
        "connection_speed": 200,
        # one connection per peer *per segment torrent*: 16 segments × 100 peers
        # is far past libtorrent's default 200, and a refused connection is a
        # segment that does not move
        "connections_limit": 20_000,
        "listen_queue_size": 512,
        "peer_turnover": 0,
        "smooth_connects": False,
        "min_reconnect_time": 1,
        "request_timeout": 10, "piece_timeout": 10, "peer_timeout": 30,
        "user_agent": "fleetp2p",
        "alert_queue_size": 100_000,
        "alert_mask": (lt.alert_category.status | lt.alert_category.error
                       | lt.alert_category.storage | lt.alert_category.piece_progress
                       | lt.alert_category.stats),
    }


class Swarm:
    def __init__(self, listen: str, metrics: Metrics) -> None:
        self.listen = listen
        self.metrics = metrics
        self._session: lt.session | None = None
        self._handles: dict[SegmentKey, lt.torrent_handle] = {}
        self._keys: dict[str, SegmentKey] = {}  # info-hash hex → key
        self._listeners: dict[str, list[Listener]] = {}  # digest → listeners
        self._reads: dict[tuple[SegmentKey, int], asyncio.Future] = {}
        # libtorrent drops add_piece while a new torrent checks its file (even an
        # empty one): pieces fetched meanwhile wait here for torrent_checked
        self._unchecked: dict[SegmentKey, list[tuple[int, bytes]]] = {}
        self._limits: dict[str, int] = {}  # digest → bytes/s each way
        self._held: dict[SegmentKey, int] = {}  # segment → bytes/s it may upload (hold_uploads)
        self._pipe: tuple[int, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats_task: asyncio.Task | None = None
        self._stats_index: dict[str, int] = {}

    # Lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        params = lt.session_params()
        params.settings = session_settings(self.listen)
        params.disk_io_constructor = "posix_disk_io_constructor"
        self._session = lt.session(params)
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pipe = (read_fd, write_fd)
        self._session.set_alert_fd(write_fd)
        self._loop.add_reader(read_fd, self._pump)
        self._stats_index = {m.name: m.value_index for m in lt.session_stats_metrics()}
        self._stats_task = asyncio.create_task(self._stats_loop(), name="swarm stats")
        log.info("swarm listening on %s (port %d)", self.listen, self.port)

    async def close(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self._session is None:
            return
        session, self._session = self._session, None
        # Its handles die with it: a timer due later (a lifted upload hold, see
        # CooperativeFetch._send_first_copies) must find no torrent, not a dead handle.
        self._handles.clear()
        self._keys.clear()
        assert self._loop is not None and self._pipe is not None
        self._loop.remove_reader(self._pipe[0])
        for fut in self._reads.values():
            if not fut.done():
                fut.set_exception(ConnectionAbortedError("swarm closed"))
        # Destroying a session joins libtorrent's threads: do it off the loop.
        session.set_alert_fd(-1)
        holder = [session]
        del session
        await asyncio.to_thread(holder.clear)
        for fd in self._pipe:
            os.close(fd)
        self._pipe = None

    @property
    def port(self) -> int:
        assert self._session is not None
        return self._session.listen_port()

    # Torrents ------------------------------------------------------------

    def subscribe(self, digest: str, listener: Listener) -> Callable[[], None]:
        self._listeners.setdefault(digest, []).append(listener)

        def unsubscribe() -> None:
            listeners = self._listeners.get(digest, [])
            if listener in listeners:
                listeners.remove(listener)
            if not listeners:
                self._listeners.pop(digest, None)
        return unsubscribe

    def add_segment(self, key: SegmentKey, metainfo: bytes, save_path: Path, *, seed: bool) -> None:
        """Start swarming a segment: seeding it from its file (`seed`, already
        verified by us), or downloading into it."""
        assert self._session is not None
        if key in self._handles:
            return
        params = lt.add_torrent_params()
        params.ti = torrent_info(metainfo)
        params.save_path = str(save_path)
        flags = params.flags & ~lt.torrent_flags.auto_managed & ~lt.torrent_flags.paused
        if seed:
            flags |= lt.torrent_flags.seed_mode
        params.flags = flags
        handle = self._session.add_torrent(params)
        self._handles[key] = handle
        if not seed:
            self._unchecked[key] = []
        self._keys[str(handle.info_hash())] = key
        if key[0] in self._limits or key in self._held:
            self._apply_limit(key[0])

    def limit(self, digest: str, rate: int) -> None:
        """Cap a blob's download and upload rates, now and for torrents added
        later (bytes/s each way, for all its segments together; 0: no cap)."""
        if rate:
            self._limits[digest] = rate
        else:
            self._limits.pop(digest, None)
        self._apply_limit(digest)

    def hold_uploads(self, keys: Iterable[SegmentKey], rate: int) -> None:
        """Cap what each of these segments uploads (bytes/s, at least MIN_RATE;
        0: lift the cap), under any cap of their blob."""
        digests = set()
        for key in keys:
            if rate:
                self._held[key] = max(MIN_RATE, rate)
            else:
                self._held.pop(key, None)
            digests.add(key[0])
        for digest in digests:
            self._apply_limit(digest)

    def _apply_limit(self, digest: str) -> None:
        """libtorrent caps each torrent: the blob's cap is split among its
        segments (a per-segment cap let 8 segments take 8 times the cap)."""
        keys = [key for key in self._handles if key[0] == digest]
        if not keys:
            return
        rate = self._limits.get(digest, 0)
        share = max(MIN_RATE, rate // len(keys)) if rate else -1
        for key in keys:
            handle, held = self._handles[key], self._held.get(key)
            handle.set_download_limit(share)
            handle.set_upload_limit(share if held is None else held if share < 0 else min(share, held))

    def disconnect(self, key: SegmentKey) -> None:
        """Drop every connection of a segment's torrent (its pieces stay)."""
        handle = self._handles.get(key)
        if handle is not None:
            handle.pause()
            handle.resume()

    def remove_segment(self, key: SegmentKey) -> None:
        self._unchecked.pop(key, None)
        self._held.pop(key, None)
        handle = self._handles.pop(key, None)
        if handle is None or self._session is None:
            return
        self._keys.pop(str(handle.info_hash()), None)
        self._session.remove_torrent(handle)

    def remove_blob(self, digest: str) -> None:
        self._limits.pop(digest, None)
        for key in [k for k in self._handles if k[0] == digest]:
            self.remove_segment(key)

    def connect(self, key: SegmentKey, peers: list[tuple[str, int]]) -> None:
        handle = self._handles.get(key)
        if handle is None:
            return
        for host, port in peers:
            try:
                handle.connect_peer((host, port))
            except RuntimeError as e:  # e.g. the torrent is being removed
                log.debug("connect_peer %s:%d failed: %s", host, port, e)

    def add_piece(self, key: SegmentKey, piece: int, data: bytes) -> None:
        """Inject a piece fetched elsewhere (upstream); libtorrent hash-checks it."""
        handle = self._handles.get(key)
        pending = self._unchecked.get(key)
        if pending is not None:
            pending.append((piece, data))
        elif handle is not None:
            handle.add_piece(piece, data, 0)  # never over a piece already on disk

    def peer_count(self, key: SegmentKey) -> int:
        handle = self._handles.get(key)
        return handle.status().num_peers if handle is not None else 0

    async def read_piece(self, key: SegmentKey, piece: int) -> bytes:
        handle = self._handles.get(key)
        if handle is None:
            raise KeyError(f"segment {key} is not in the swarm")
        assert self._loop is not None
        fut = self._reads.get((key, piece))
        if fut is None:
            fut = self._loop.create_future()
            self._reads[(key, piece)] = fut
            handle.read_piece(piece)
        return await asyncio.shield(fut)

    # Alerts --------------------------------------------------------------

    def _pump(self) -> None:
        assert self._pipe is not None
        try:
            while os.read(self._pipe[0], 4096):
                pass
        except BlockingIOError:
            pass
        if self._session is None:
            return
        for alert in self._session.pop_alerts():
            try:
                self._handle_alert(alert)
            except Exception:  # one bad alert must not stop the pump
                log.exception("handling %s", type(alert).__name__)

    def _key_of(self, alert) -> SegmentKey | None:
        handle = getattr(alert, "handle", None)
        if handle is None or not handle.is_valid():
            return None
        return self._keys.get(str(handle.info_hash()))

    def _handle_alert(self, alert) -> None:
        if isinstance(alert, lt.session_stats_alert):
            self._record_stats(alert.values)
            return
        if isinstance(alert, lt.read_piece_alert):
            key = self._key_of(alert)
            fut = self._reads.pop((key, alert.piece), None) if key else None
            if fut is not None and not fut.done():
                if alert.error.value():
                    fut.set_exception(OSError(alert.error.message()))
                else:
                    fut.set_result(bytes(alert.buffer))
            return
        key = self._key_of(alert)
        if key is None:
            return
        event: SwarmEvent | None = None
        if isinstance(alert, lt.piece_finished_alert):
            event = PieceFinished(key, int(alert.piece_index))
        elif isinstance(alert, lt.torrent_finished_alert):
            event = SegmentFinished(key)
        elif isinstance(alert, lt.torrent_checked_alert):
            for piece, data in self._unchecked.pop(key, ()):
                self.add_piece(key, piece, data)
            event = SegmentChecked(key)
        elif isinstance(alert, lt.hash_failed_alert):
            self.metrics.piece_hash_failures.inc()
            event = HashFailed(key, int(alert.piece_index))
        elif isinstance(alert, (lt.torrent_error_alert, lt.file_error_alert)):
            event = TorrentFailed(key, alert.message())
            log.warning("torrent %s: %s", key, alert.message())
        if event is not None:
            for listener in list(self._listeners.get(key[0], ())):
                listener(event)

    async def _stats_loop(self) -> None:
        while True:
            if self._session is not None:
                self._session.post_session_stats()
            await asyncio.sleep(STATS_INTERVAL)

    def _record_stats(self, values) -> None:
        def value(name: str) -> int:
            if isinstance(values, dict):  # the binding hands a name → value dict
                return int(values.get(name, 0))
            index = self._stats_index.get(name)
            return int(values[index]) if index is not None else 0
        self.metrics.peers_connected.set(value("peer.num_tcp_peers"))
        self.metrics.torrents.set(len(self._handles))

