"""Request ids of Submit* calls (AIP-155): the same id from the same tenant
returns the first resource (core.tasks.fingerprint_of tells a retry of the same
body from a reuse of the id for another)."""

from __future__ import annotations

from kernelmesh.core.errors import InvalidArgument, Violation

MAX_REQUEST_ID = 128


def check_request_id(request_id: str, field: str = "request_id") -> str:
    """The request id, refused when longer than MAX_REQUEST_ID characters."""
    if len(request_id) > MAX_REQUEST_ID:
        raise InvalidArgument([Violation(field, f"at most {MAX_REQUEST_ID} characters")])
    return request_id


__all__ = ["MAX_REQUEST_ID", "check_request_id"]
