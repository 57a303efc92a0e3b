"""fleetp2p: a peer-to-peer OCI pull-through mirror for machine fleets."""

__version__ = "0.1.0"
