"""The PostgreSQL store: several sidecars on one database (`pip install dt-trio[postgres]`)."""

from dt_trio._store._postgres._schema import SCHEMA_VERSION, InvalidHubName, check_hub
from dt_trio._store._postgres._store import (
    DEFAULT_LEASE_TTL,
    PostgresBackend,
    describe,
    is_postgres_address,
)

__all__ = [
    "DEFAULT_LEASE_TTL",
    "SCHEMA_VERSION",
    "InvalidHubName",
    "PostgresBackend",
    "check_hub",
    "describe",
    "is_postgres_address",
]
