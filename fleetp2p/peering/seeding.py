"""Seeding what the store already holds, after a restart: every complete blob
whose segment metainfo was kept beside it goes back into the swarm."""

from __future__ import annotations

import logging

from fleetp2p.oci.reference import Digest
from fleetp2p.peering.announcer import Announcer
from fleetp2p.store import BlobStore
from fleetp2p.swarm import Swarm

log = logging.getLogger(__name__)


def stored_metainfo(store: BlobStore) -> list[tuple[str, list[bytes]]]:
    """(digest, metainfo per segment) of blobs that can be seeded. Blocking."""
    found = []
    for entry in store.entries():
        metainfo = []
        for index in range(entry.geometry.segments):
            try:
                metainfo.append((entry.path / f"{index}.torrent").read_bytes())
            except FileNotFoundError:
                break
        if metainfo and len(metainfo) == entry.geometry.segments:
            found.append((str(entry.digest), metainfo))
    return found


def restore(store: BlobStore, swarm: Swarm, announcer: Announcer,
            found: list[tuple[str, list[bytes]]]) -> None:
    for digest, metainfo in found:
        directory = store.path_for(Digest.parse(digest))
        for index, info in enumerate(metainfo):
            try:
                swarm.add_segment((digest, index), info, directory, seed=True)
            except RuntimeError as e:
                log.warning("cannot seed %s segment %d: %s", digest, index, e)
                break
        else:
            announcer.hold_all(digest)
    if found:
        log.info("seeding %d stored blobs", len(found))
