"""Persistence: the Backend protocol, its sqlite and PostgreSQL implementations."""

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
from dt_trio._store._select import (
    DEFAULT_HUB,
    DEFAULT_LEASE_TTL,
    InvalidHubName,
    check_hub,
    is_postgres_address,
    make_store,
)
from dt_trio._store._sqlite import SqliteBackend

__all__ = [
    "DEFAULT_HUB",
    "DEFAULT_LEASE_TTL",
    "Backend",
    "Durability",
    "EntityFilter",
    "InstanceFilter",
    "InvalidHubName",
    "Leased",
    "NullListener",
    "PageKey",
    "SqliteBackend",
    "StoreListener",
    "check_hub",
    "is_postgres_address",
    "make_store",
    "notify",
]
