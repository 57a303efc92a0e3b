"""Manifests: immutable by digest, short-lived by tag, forwarded with the client's Accept.

A registry answers with the manifest type the client accepts (and 404 when
none fits), so the client's Accept list is forwarded as is and a cached tag
answer is reused only if its media type is one the client listed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass

from fleetp2p.errors import UpstreamError
from fleetp2p.lazy.layers import LazyLayers
from fleetp2p.metrics import Metrics
from fleetp2p.oci.reference import Digest, is_digest
from fleetp2p.store import BlobStore, TagCache
from fleetp2p.upstream import UpstreamClient

log = logging.getLogger(__name__)

MAX_ORIGINS = 200_000


@dataclass(frozen=True)
class Manifest:
    content: bytes
    media_type: str
    digest: Digest


class ManifestService:
    def __init__(self, store: BlobStore, tags: TagCache, upstream: UpstreamClient,
                 metrics: Metrics, lazy_layers: LazyLayers | None = None) -> None:
        self.store = store
        self.lazy_layers = lazy_layers or LazyLayers()
        self._learned: OrderedDict[Digest, None] = OrderedDict()
        self.tags = tags
        self.upstream = upstream
        self.metrics = metrics
        self._inflight: dict[tuple, asyncio.Future] = {}
        # digest → (registry, repository) of the manifest that named it, so a
        # request without ?ns= (skopeo, stargz-snapshotter) still finds its upstream.
        self._origins: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def origin(self, digest: Digest) -> tuple[str, str] | None:
        return self._origins.get(str(digest))

    async def get(self, registry: str, repository: str, reference: str,
                  accept: list[str]) -> Manifest:
        key = (registry, repository, reference, tuple(accept))
        pending = self._inflight.get(key)
        if pending is not None:
            self.metrics.coalesced.labels("manifest").inc()
            return await asyncio.shield(pending)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            result = await self._resolve(registry, repository, reference, accept)
            self._learn(result, registry, repository)
            fut.set_result(result)
            return result
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody joined
            raise
        finally:
            del self._inflight[key]

    async def _resolve(self, registry: str, repository: str, reference: str,
                       accept: list[str]) -> Manifest:
        if is_digest(reference):
            digest = Digest.parse(reference)
            cached = await self._cached(digest)
            if cached is not None:
                return cached
            return await self._fetch(registry, repository, reference, accept)
        entry = await asyncio.to_thread(self.tags.get, registry, repository, reference)
        acceptable = entry is not None and entry.media_type in accept
        if entry is not None and acceptable and entry.fresh(self.tags.ttl):
            cached = await self._cached(Digest.parse(entry.digest))
            if cached is not None:
                return cached
        try:
            return await self._fetch(registry, repository, reference, accept)
        except UpstreamError as e:
            if e.status == 404:
                await asyncio.to_thread(self.tags.drop, registry, repository, reference)
                raise
            if entry is not None and acceptable and not e.not_found:
                cached = await self._cached(Digest.parse(entry.digest))
                if cached is not None:
                    log.warning("upstream unavailable (%s); serving stale %s/%s:%s → %s", e,
                                registry, repository, reference, entry.digest)
                    return cached
            raise

    async def _cached(self, digest: Digest) -> Manifest | None:
        media_type = self.store.media_type(digest)
        if media_type is None:
            return None
        content = await asyncio.to_thread(self.store.read_bytes, digest)
        if content is None:
            return None
        return Manifest(content, media_type, digest)

    async def _fetch(self, registry: str, repository: str, reference: str,
                     accept: list[str]) -> Manifest:
        got = await self.upstream.get_manifest(registry, repository, reference, accept)
        await asyncio.to_thread(self.store.put_bytes, got.digest, got.content, got.media_type)
        if not is_digest(reference):
            await asyncio.to_thread(self.tags.put, registry, repository, reference,
                                    str(got.digest), got.media_type)
        return Manifest(got.content, got.media_type, got.digest)

    def _learn(self, manifest: Manifest, registry: str, repository: str) -> None:
        """Remember what a manifest says about its blobs: where they come from
        and which are lazily readable. Once per manifest digest."""
        if manifest.digest in self._learned:
            self._learned.move_to_end(manifest.digest)
            return
        self._learned[manifest.digest] = None
        while len(self._learned) > MAX_ORIGINS:
            self._learned.popitem(last=False)
        try:
            document = json.loads(manifest.content)
        except ValueError:
            return
        if self.lazy_layers.learn(document):
            self.metrics.lazy_layers.set(len(self.lazy_layers))
        for digest in referenced_digests(document):
            self._origins[digest] = (registry, repository)
            self._origins.move_to_end(digest)
        while len(self._origins) > MAX_ORIGINS:
            self._origins.popitem(last=False)


def referenced_digests(document: object) -> list[str]:
    """Digests of everything a manifest or index points at (config, layers,
    blobs, child manifests, subject)."""
    if not isinstance(document, dict):
        return []
    found = []
    descriptors = []
    for key in ("config", "subject"):
        if isinstance(document.get(key), dict):
            descriptors.append(document[key])
    for key in ("layers", "manifests", "blobs"):
        if isinstance(document.get(key), list):
            descriptors.extend(d for d in document[key] if isinstance(d, dict))
    for descriptor in descriptors:
        digest = descriptor.get("digest")
        if isinstance(digest, str):
            found.append(digest)
    return found
