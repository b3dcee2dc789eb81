"""Which store a `--db` address names: an sqlite file, "" in memory, or a PostgreSQL database.

Nothing here needs psycopg: the PostgreSQL store is imported only when it is asked for.
"""

from __future__ import annotations

import re

from dt_trio._errors import StoreUnavailable
from dt_trio._store._backend import Backend, StoreListener
from dt_trio._store._durability import Durability

DEFAULT_HUB = "default"
DEFAULT_LEASE_TTL = 30.0
_HUB_NAME = re.compile(r"[A-Za-z0-9_]{1,55}")


class InvalidHubName(ValueError):
    """A task hub name that cannot name a hub (see `check_hub`)."""


def check_hub(hub: str) -> str:
    """`hub` if it can name a task hub: 1 to 55 letters, digits or underscores (it becomes
    part of a PostgreSQL schema name, whose limit is 63 bytes)."""
    if not _HUB_NAME.fullmatch(hub):
        raise InvalidHubName(
            f"invalid task hub name {hub!r}: use 1 to 55 letters, digits or underscores"
        )
    return hub


def is_postgres_address(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def make_store(
    db: str,
    listener: StoreListener,
    *,
    hub: str = DEFAULT_HUB,
    lease_ttl: float = DEFAULT_LEASE_TTL,
    durability: Durability = Durability.NORMAL,
) -> Backend:
    """The store `db` names, not yet opened: a `PostgresBackend` for a postgresql:// address
    (hub `hub`, leases of `lease_ttl` seconds), a `SqliteBackend` otherwise (one hub per file:
    `hub` must be the default); either committing with `durability`."""
    check_hub(hub)
    if is_postgres_address(db):
        try:
            from dt_trio._store._postgres import PostgresBackend
        except ImportError as exc:
            raise StoreUnavailable(
                f"the PostgreSQL store needs psycopg ({exc}): pip install 'dt-trio[postgres]'"
            ) from None
        return PostgresBackend(
            db, hub, listener=listener, lease_ttl=lease_ttl, durability=durability
        )
    if hub != DEFAULT_HUB:
        raise InvalidHubName(
            f"--hub {hub}: an sqlite file holds one task hub; hubs share PostgreSQL databases"
        )
    from dt_trio._store._sqlite import SqliteBackend

    return SqliteBackend(db, listener=listener, durability=durability)
