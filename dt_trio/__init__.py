"""dt-trio: a durable-orchestration engine and Durable Task gRPC sidecar built on trio.

Run the sidecar from a script with ``trio.run(dt_trio.serve)`` (or with keywords:
``dt_trio.serve(host=..., port=..., db=...)``), or from the shell with ``dt-trio``.
"""

from dt_trio._errors import (
    DtTrioError,
    FailedPrecondition,
    InstanceExists,
    InstanceNotFound,
    InvalidRequest,
    LockLost,
    StoreUnavailable,
    UnknownWorkItem,
)
from dt_trio._hub import serve

__all__ = [
    "DtTrioError",
    "FailedPrecondition",
    "InstanceExists",
    "InstanceNotFound",
    "InvalidRequest",
    "LockLost",
    "StoreUnavailable",
    "UnknownWorkItem",
    "serve",
]
