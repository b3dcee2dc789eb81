"""Processors and executors: pull work from the store, run it, commit the result."""

from dt_trio._engine._client import HubClient
from dt_trio._engine._executor import RemoteExecutor, Route, WorkAbandoned
from dt_trio._engine._processors import ActivityProcessor, EntityProcessor, OrchestrationProcessor
from dt_trio._engine._signals import Signals

__all__ = [
    "ActivityProcessor",
    "EntityProcessor",
    "HubClient",
    "OrchestrationProcessor",
    "RemoteExecutor",
    "Route",
    "Signals",
    "WorkAbandoned",
]
