"""fleetp2p tracker: maps blob digests to segments, leases and the peers that hold them."""
