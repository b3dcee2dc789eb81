"""Orchestrations written in Python and run in the hub's own process: no gRPC, no sidecar.

The replay engine (`_replay`) is pure, like the orchestration core; the local executor runs it
and the activities inside the hub; the client manages instances.
"""

from dt_trio._local._client import Client, EntityMetadata, OrchestrationState, entity_id
from dt_trio._local._executor import ActivityContext, EntityContext, LocalExecutor
from dt_trio._local._registry import Registry
from dt_trio._local._replay import CriticalSection, OrchestrationContext, run_orchestrator
from dt_trio._local._tasks import (
    NonDeterminismError,
    RetryPolicy,
    Task,
    TaskFailedError,
    when_all,
    when_any,
)

__all__ = [
    "ActivityContext",
    "Client",
    "CriticalSection",
    "EntityContext",
    "EntityMetadata",
    "LocalExecutor",
    "NonDeterminismError",
    "OrchestrationContext",
    "OrchestrationState",
    "Registry",
    "RetryPolicy",
    "Task",
    "TaskFailedError",
    "entity_id",
    "run_orchestrator",
    "when_all",
    "when_any",
]
