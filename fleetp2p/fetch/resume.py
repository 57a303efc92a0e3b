"""What an interrupted download left on disk, and what libtorrent's check of it found.

When the store hands a fetch the files of an earlier attempt (see
store/partials.py), every segment file that holds bytes is checked by
libtorrent when its torrent is added: it reports each piece that matches its
hash, then the end of the check. Until then the segment gets no peers, so
nothing is fetched twice. Segments whose saved metainfo the tracker no
longer knows (it restarted, as an embedded tracker does with its agent) are
checked against that metainfo; if they turn out complete they are published
again, otherwise they are fetched like any unpublished segment.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fleetp2p.store import Geometry
from fleetp2p.store.segments import segment_path
from fleetp2p.swarm.metainfo import check_metainfo

log = logging.getLogger(__name__)


def metainfo_path(directory: Path, index: int) -> Path:
    return directory / f"{index}.torrent"


class Resume:
    def __init__(self, geometry: Geometry, on_disk: set[int], saved: dict[int, bytes]) -> None:
        self.geometry = geometry
        self.on_disk = on_disk  # segments whose file holds bytes
        self.saved = saved      # their metainfo as saved by the earlier attempt
        self.checking: set[int] = set()
        self.unpublished: dict[int, bytes] = {}  # being checked against saved metainfo only
        self._found: dict[int, int] = {}  # bytes found per segment

    @classmethod
    def scan(cls, directory: Path, geometry: Geometry) -> "Resume":
        """Blocking: stats and reads small files."""
        on_disk: set[int] = set()
        saved: dict[int, bytes] = {}
        for index in range(geometry.segments):
            try:
                if segment_path(directory, index).stat().st_size == 0:
                    continue
            except FileNotFoundError:
                continue
            on_disk.add(index)
            try:
                metainfo = metainfo_path(directory, index).read_bytes()
                check_metainfo(metainfo, index, geometry.segment_length(index), geometry.piece_size)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                log.info("ignoring saved metainfo of segment %d in %s: %s", index, directory, e)
                continue
            saved[index] = metainfo
        return cls(geometry, on_disk, saved)

    def begin_check(self, index: int) -> bool:
        """The segment's torrent is being added: True if libtorrent will check a file."""
        if index in self.on_disk:
            self.checking.add(index)
            return True
        return False

    def found(self, index: int, piece: int) -> None:
        """A piece reported while its segment is checked was on disk already."""
        if index in self.checking:
            start, end = self.geometry.segment_span(index)
            size = self.geometry.piece_size
            self._found[index] = self._found.get(index, 0) + min(size, end - start - piece * size)

    def found_in(self, index: int) -> int:
        return self._found.get(index, 0)

    def complete_on_disk(self, index: int) -> bool:
        return self.found_in(index) == self.geometry.segment_length(index)

    def checked(self, index: int) -> int:
        """The check is over; bytes it found."""
        self.checking.discard(index)
        return self.found_in(index)

    def forget(self, index: int) -> None:
        """The segment's bytes will be fetched again: what was found does not count."""
        self._found.pop(index, None)
        self.unpublished.pop(index, None)
