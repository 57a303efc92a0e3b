"""Content-addressed, verified, crash-safe storage of blobs and manifests on one node."""

from fleetp2p.store.blobs import BlobStore, StoredBlob, TempBlob
from fleetp2p.store.tags import TagCache, TagEntry

__all__ = ["BlobStore", "StoredBlob", "TempBlob", "TagCache", "TagEntry"]
