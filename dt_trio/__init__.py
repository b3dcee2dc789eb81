"""dt-trio: a durable-orchestration engine and Durable Task gRPC sidecar built on trio.

Run the sidecar from a script with ``trio.run(dt_trio.serve)`` (or with keywords:
``dt_trio.serve(host=..., port=..., db=...)``), or from the shell with ``dt-trio``.

Or write orchestrations in Python and run them in your own process: register them in a
`Registry` and open a hub with ``async with dt_trio.open_task_hub(db, registry=registry) as
client``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dt_trio._core import Status
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
    from dt_trio._hub import open_task_hub, serve
    from dt_trio._local import (
        ActivityContext,
        Client,
        CriticalSection,
        EntityContext,
        EntityMetadata,
        NonDeterminismError,
        OrchestrationContext,
        OrchestrationState,
        Registry,
        RetryPolicy,
        Task,
        TaskFailedError,
        entity_id,
        when_all,
        when_any,
    )

# The modules the names below come from, imported on first use (PEP 562) so that the operator
# commands (`dt-trio instances ...`) start without loading the engine.
_HOMES = ("dt_trio._core", "dt_trio._errors", "dt_trio._hub", "dt_trio._local")

__all__ = [
    "ActivityContext",
    "Client",
    "CriticalSection",
    "DtTrioError",
    "EntityContext",
    "EntityMetadata",
    "FailedPrecondition",
    "InstanceExists",
    "InstanceNotFound",
    "InvalidRequest",
    "LockLost",
    "NonDeterminismError",
    "OrchestrationContext",
    "OrchestrationState",
    "Registry",
    "RetryPolicy",
    "Status",
    "StoreUnavailable",
    "Task",
    "TaskFailedError",
    "UnknownWorkItem",
    "entity_id",
    "open_task_hub",
    "serve",
    "when_all",
    "when_any",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        for home in _HOMES:
            value = getattr(importlib.import_module(home), name, _MISSING)
            if value is not _MISSING:
                globals()[name] = value
                return value
    raise AttributeError(f"module 'dt_trio' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


_MISSING = object()
