"""The fetch path: local store → (peers, next) → upstream, one fetch per digest."""

from fleetp2p.fetch.blobs import BlobFetcher, BlobSource
from fleetp2p.fetch.manifests import Manifest, ManifestService

__all__ = ["BlobFetcher", "BlobSource", "Manifest", "ManifestService"]
