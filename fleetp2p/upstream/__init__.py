"""The client side towards upstream registries: auth, redirects, retries, resumable blob streams."""

from fleetp2p.upstream.client import UpstreamBlob, UpstreamClient, UpstreamManifest

__all__ = ["UpstreamBlob", "UpstreamClient", "UpstreamManifest"]
