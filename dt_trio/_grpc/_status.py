"""The one place where dt-trio errors become gRPC status codes."""

from __future__ import annotations

from purerpc.grpclib.status import StatusCode

from dt_trio import _errors as errors

_CODES: dict[type[errors.DtTrioError], StatusCode] = {
    errors.AnswerTooLarge: StatusCode.RESOURCE_EXHAUSTED,
    errors.InvalidRequest: StatusCode.INVALID_ARGUMENT,
    errors.InstanceNotFound: StatusCode.NOT_FOUND,
    errors.InstanceExists: StatusCode.ALREADY_EXISTS,
    errors.UnknownWorkItem: StatusCode.NOT_FOUND,
    errors.FailedPrecondition: StatusCode.FAILED_PRECONDITION,
    errors.LockLost: StatusCode.ABORTED,
    errors.StoreUnavailable: StatusCode.UNAVAILABLE,
}


def status_for(exc: BaseException) -> tuple[StatusCode, str] | None:
    """The status a handler's exception is answered with; None for an unexpected error."""
    if isinstance(exc, errors.DtTrioError):
        for cls in type(exc).__mro__:
            code = _CODES.get(cls)
            if code is not None:
                return code, str(exc)
        return StatusCode.INTERNAL, str(exc)
    return None
