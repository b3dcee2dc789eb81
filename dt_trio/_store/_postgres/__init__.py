"""The PostgreSQL store: several sidecars on one database (`pip install dt-trio[postgres]`)."""

from dt_trio._store._postgres._schema import SCHEMA_VERSION
from dt_trio._store._postgres._store import PostgresBackend, describe

__all__ = ["SCHEMA_VERSION", "PostgresBackend", "describe"]
