"""The one place where dt-trio errors become gRPC status codes."""

from __future__ import annotations

from purerpc.grpclib.status import StatusCode

from dt_trio._errors import (
    AnswerTooLarge,
    DtTrioError,
    FailedPrecondition,
    InstanceExists,
    InstanceNotFound,
    InvalidRequest,
    LockLost,
    StoreUnavailable,
    UnknownWorkItem,
)

_CODES: dict[type[DtTrioError], StatusCode] = {
    AnswerTooLarge: StatusCode.RESOURCE_EXHAUSTED,
    InvalidRequest: StatusCode.INVALID_ARGUMENT,
    InstanceNotFound: StatusCode.NOT_FOUND,
    InstanceExists: StatusCode.ALREADY_EXISTS,
    UnknownWorkItem: StatusCode.NOT_FOUND,
    FailedPrecondition: StatusCode.FAILED_PRECONDITION,
    LockLost: StatusCode.ABORTED,
    StoreUnavailable: StatusCode.UNAVAILABLE,
}


def status_for(exc: BaseException) -> tuple[StatusCode, str] | None:
    """The status a handler's exception is answered with; None for an unexpected error."""
    if isinstance(exc, DtTrioError):
        for cls in type(exc).__mro__:
            code = _CODES.get(cls)
            if code is not None:
                return code, str(exc)
        return StatusCode.INTERNAL, str(exc)
    return None
