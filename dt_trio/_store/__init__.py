"""Persistence: the Backend protocol and its sqlite implementation."""

from dt_trio._store._backend import (
    ActivityWorkItem,
    Backend,
    EntityFilter,
    EntityWorkItem,
    Handed,
    InstanceFilter,
    Leased,
    OrchestrationWorkItem,
    PageKey,
    StepAhead,
    StoreListener,
)
from dt_trio._store._durability import Durability
from dt_trio._store._sqlite import SqliteBackend

__all__ = [
    "ActivityWorkItem",
    "Backend",
    "Durability",
    "EntityFilter",
    "EntityWorkItem",
    "Handed",
    "InstanceFilter",
    "Leased",
    "OrchestrationWorkItem",
    "PageKey",
    "SqliteBackend",
    "StepAhead",
    "StoreListener",
]
