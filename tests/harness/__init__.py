"""Test harness: starts real third-party software (registry, containerd, skopeo, podman)
and the fleetp2p agent on 127.0.0.1, each in its own temp dir, always cleaned up.

Every starter is a context manager; `tests/conftest.py` wraps them in pytest fixtures.
"""
