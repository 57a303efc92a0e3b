"""The agent's admin API for the operator CLI (`seed`, `pull`, `status`).

Mounted on the agent's own listener under `/_fleetp2p/v1/`. The agent does
the work (it holds the upstream credentials and the store); the CLI only
sends a request and renders what comes back.
"""

from fleetp2p.admin.api import ADMIN_API_PREFIX, add_admin_routes

__all__ = ["ADMIN_API_PREFIX", "add_admin_routes"]
