"""Errors of the admin API, each with the HTTP status it is answered with.

The CLI turns the status back into an exit code: 400 is a usage error (2),
everything else an operation failure (1).
"""

from __future__ import annotations

from fleetp2p.errors import FleetError


class AdminError(FleetError):
    status = 500


class BadRequest(AdminError):
    """The request itself is wrong: malformed JSON, bad reference or platform syntax."""

    status = 400


class Forbidden(AdminError):
    status = 403


class NotFound(AdminError):
    """The reference, tag, platform or pin does not exist."""

    status = 404


class InvalidContent(AdminError):
    """Upstream returned something we cannot use (bad manifest, unsupported type)."""

    status = 502
