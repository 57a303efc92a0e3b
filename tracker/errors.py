"""Tracker errors, server side and client side, in one place.

Server side: backends raise `ApiError` subclasses; the HTTP layer turns them
into a msgpack body `{"error": code, "message": ...}` with the class's status.

Client side: the agent must tell "the tracker said no" (a 4xx: our request
was wrong or the state forbids it — falling back to upstream would not help
that request's logic) from "the tracker is not there" (connection refused,
timeout, 5xx — fall back to upstream and carry on). Hence `TrackerError` vs
`TrackerUnavailable`, both under `TrackerClientError` so one `except` can
catch everything when that is what the caller wants.
"""

from __future__ import annotations

from fleetp2p.errors import FleetError


class ApiError(FleetError):
    """An error the tracker API answers with; `code` is stable, `message` is for humans."""

    code = "INTERNAL"
    status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(ApiError):
    code, status = "BAD_REQUEST", 400


class Unauthorized(ApiError):
    code, status = "UNAUTHORIZED", 401


class NotFound(ApiError):
    code, status = "NOT_FOUND", 404


class BlobUnknown(NotFound):
    code = "BLOB_UNKNOWN"


class Conflict(ApiError):
    code, status = "CONFLICT", 409


class UnsupportedMediaType(ApiError):
    code, status = "UNSUPPORTED_MEDIA_TYPE", 415


class BackendUnavailable(ApiError):
    """The storage behind the tracker (Redis) cannot be reached: a 503 the client retries elsewhere."""

    code, status = "BACKEND_UNAVAILABLE", 503


# Client side ---------------------------------------------------------------

class TrackerClientError(FleetError):
    """Base of everything `TrackerClient` raises."""


class TrackerUnavailable(TrackerClientError):
    """No usable answer: connection error, timeout, 5xx or a garbled body. Fall back to upstream."""


class TrackerError(TrackerClientError):
    """The tracker answered with a 4xx; `status` and `code` say why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"tracker: {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class TrackerNotFound(TrackerError):
    """404: unknown blob (or segment/route)."""


class TrackerConflict(TrackerError):
    """409: the state contradicts the request (size mismatch, different metainfo already published)."""


class TrackerUnauthorized(TrackerError):
    """401: missing or wrong bearer token."""
