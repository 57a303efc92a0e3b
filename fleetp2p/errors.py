"""One exception hierarchy for the whole agent.

The registry front maps `RegistryError` subclasses to OCI error JSON; the CLI
maps any `FleetError` to one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

from typing import Any


class FleetError(Exception):
    """Base of every error fleetp2p raises on purpose."""


class ConfigError(FleetError):
    """The configuration is invalid; the message names the offending key."""


class RegistryError(FleetError):
    """An error that has an OCI distribution-spec representation."""

    code = "UNKNOWN"
    status = 500

    def __init__(self, message: str, *, detail: Any = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        if status is not None:
            self.status = status

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return {"errors": [error]}


class NameInvalid(RegistryError):
    code, status = "NAME_INVALID", 400


class DigestInvalid(RegistryError):
    code, status = "DIGEST_INVALID", 400


class ManifestInvalid(RegistryError):
    code, status = "MANIFEST_INVALID", 400


class ManifestUnknown(RegistryError):
    code, status = "MANIFEST_UNKNOWN", 404


class BlobUnknown(RegistryError):
    code, status = "BLOB_UNKNOWN", 404


class RangeInvalid(RegistryError):
    code, status = "RANGE_INVALID", 416


class Unsupported(RegistryError):
    code, status = "UNSUPPORTED", 405


class TooManyRequests(RegistryError):
    code, status = "TOOMANYREQUESTS", 429


class UpstreamError(FleetError):
    """The upstream registry could not give us what we asked for.

    `not_found` distinguishes "upstream says it does not exist / we may not
    see it" from "upstream is broken or unreachable"; both become a 404 for the
    client (a mirror never challenges its client), but they are counted and
    logged differently.
    """

    def __init__(self, message: str, *, status: int | None = None, reason: str = "error",
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after

    @property
    def not_found(self) -> bool:
        return self.status in (401, 403, 404)


class VerificationError(FleetError):
    """Bytes did not match the digest (or piece hash) they were promised to have."""


class StorageError(FleetError):
    """This node cannot write or read its own copy (disk full, I/O error): the
    fetch stops at once rather than waiting for bytes that cannot land."""
