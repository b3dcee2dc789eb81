"""Processors and executors: pull work from the store, run it, commit the result."""

from dt_trio._engine._client import HubClient
from dt_trio._engine._dispatch import Dispatcher
from dt_trio._engine._executor import (
    Executor,
    LocalRunner,
    RemoteExecutor,
    Route,
    RoutingExecutor,
    WorkAbandoned,
    WorkTooLarge,
    WorkUnclaimed,
)
from dt_trio._engine._processors import (
    ActivityProcessor,
    EntityProcessor,
    OrchestrationProcessor,
)
from dt_trio._engine._signals import Signals

__all__ = [
    "ActivityProcessor",
    "Dispatcher",
    "EntityProcessor",
    "Executor",
    "HubClient",
    "LocalRunner",
    "OrchestrationProcessor",
    "RemoteExecutor",
    "Route",
    "RoutingExecutor",
    "Signals",
    "WorkAbandoned",
    "WorkTooLarge",
    "WorkUnclaimed",
]
