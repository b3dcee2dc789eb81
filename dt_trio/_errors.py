"""The error hierarchy of dt-trio.

Every failure that a caller can cause or should know about is one of these. The gRPC layer maps
them to status codes in exactly one place (``dt_trio._grpc._status``); anything else that escapes
a handler is a bug and is answered with INTERNAL.
"""

from __future__ import annotations


class DtTrioError(Exception):
    """Base class of every error dt-trio raises on purpose."""


class InvalidRequest(DtTrioError):
    """The request is malformed: a required field is empty, a value is out of range, ..."""


class InstanceNotFound(DtTrioError):
    """No orchestration instance has the given id."""

    def __init__(self, instance_id: str) -> None:
        super().__init__(f"no orchestration instance with id '{instance_id}'")
        self.instance_id = instance_id


class InstanceExists(DtTrioError):
    """An instance with the id already exists and may not be replaced."""

    def __init__(self, instance_id: str, status: str) -> None:
        super().__init__(
            f"an orchestration instance with id '{instance_id}' already exists "
            f"and is {status}; purge it or choose another id"
        )
        self.instance_id = instance_id


class UnknownWorkItem(DtTrioError):
    """A completion or abandon names a work item this sidecar does not hold (unknown or stale
    completion token, or the work item was already completed, abandoned or redelivered)."""


class FailedPrecondition(DtTrioError):
    """The instance is in a state that does not allow the operation."""


class LockLost(DtTrioError):
    """A work item's lease was lost before its result could be committed."""


class StoreUnavailable(DtTrioError):
    """The store cannot serve the request right now (locked, read-only, full, closed)."""


class AnswerTooLarge(DtTrioError):
    """An answer would be larger than a client receives, even with its payloads left out."""
