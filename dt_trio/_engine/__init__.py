"""Processors and executors: pull work from the store, run it, commit the result."""

from dt_trio._engine._client import HubClient
from dt_trio._engine._executor import (
    Executor,
    LocalRunner,
    RemoteExecutor,
    Route,
    RoutingExecutor,
    WorkAbandoned,
    WorkTooLarge,
)
from dt_trio._engine._processors import (
    ActivityProcessor,
    EntityProcessor,
    OrchestrationProcessor,
    link,
)
from dt_trio._engine._signals import Signals

__all__ = [
    "ActivityProcessor",
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
    "link",
]
