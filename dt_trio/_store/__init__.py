"""Persistence: the Backend protocol and its sqlite implementation."""

from dt_trio._store._backend import (
    Backend,
    EntityFilter,
    InstanceFilter,
    Leased,
    NullListener,
    PageKey,
    StoreListener,
    notify,
)
from dt_trio._store._durability import Durability
from dt_trio._store._sqlite import SqliteBackend

__all__ = [
    "Backend",
    "Durability",
    "EntityFilter",
    "InstanceFilter",
    "Leased",
    "NullListener",
    "PageKey",
    "SqliteBackend",
    "StoreListener",
    "notify",
]
