"""The `fleetp2p` command line."""
