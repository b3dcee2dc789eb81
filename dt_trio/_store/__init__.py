"""Persistence: the Backend protocol, its sqlite and PostgreSQL implementations."""

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
    "ActivityWorkItem",
    "Backend",
    "EntityFilter",
    "EntityWorkItem",
    "Handed",
    "InstanceFilter",
    "InvalidHubName",
    "Leased",
    "OrchestrationWorkItem",
    "PageKey",
    "SqliteBackend",
    "StepAhead",
    "StoreListener",
    "check_hub",
    "is_postgres_address",
    "make_store",
]
