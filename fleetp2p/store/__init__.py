"""Content-addressed, verified, crash-safe storage of blobs and manifests on one node."""

from fleetp2p.store.blobs import BlobStore, StoredBlob
from fleetp2p.store.geometry import Geometry
from fleetp2p.store.segments import SegmentReader, SegmentWriter
from fleetp2p.store.tags import TagCache, TagEntry

__all__ = ["BlobStore", "Geometry", "SegmentReader", "SegmentWriter", "StoredBlob", "TagCache",
           "TagEntry"]
