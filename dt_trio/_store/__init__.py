"""Persistence: the Backend protocol and its sqlite implementation."""

from dt_trio._store._backend import (
    ActivityWorkItem,
    Backend,
    OrchestrationWorkItem,
    StoreListener,
)
from dt_trio._store._sqlite import SqliteBackend

__all__ = ["ActivityWorkItem", "Backend", "OrchestrationWorkItem", "SqliteBackend", "StoreListener"]
