"""The sqlite store's schema: created on a new store, migrated on an older one."""

from __future__ import annotations

import pathlib
import sqlite3

from dt_trio._errors import StoreUnavailable

SCHEMA = (pathlib.Path(__file__).parent / "schema.sql").read_text()
VERSION = 2

# Version 1 named a lease `locked_by` (a lock is an entity's critical section), counted failed
# attempts as `dequeue_count`, and had no lease epochs.
_FROM_1 = (
    "ALTER TABLE instances RENAME COLUMN locked_by TO leased_by",
    "ALTER TABLE instances RENAME COLUMN dequeue_count TO failed_attempts",
    "ALTER TABLE instances ADD COLUMN lease_epoch INTEGER",
    "ALTER TABLE activities RENAME COLUMN locked_by TO leased_by",
    "ALTER TABLE activities RENAME COLUMN dequeue_count TO failed_attempts",
    "ALTER TABLE activities ADD COLUMN lease_epoch INTEGER",
    "ALTER TABLE entities RENAME COLUMN dequeue_count TO failed_attempts",
    "ALTER TABLE entities ADD COLUMN lease_epoch INTEGER",
    "PRAGMA user_version = 2",
)


def prepare(conn: sqlite3.Connection, description: str) -> None:
    """Bring the store to this version's schema, and void the leases of the process that
    had it before: one process owns a store, so they are nobody's now."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > VERSION:
        raise StoreUnavailable(
            f"the store {description} has schema version {version}, written by a newer "
            f"dt-trio (this one knows versions up to {VERSION}); upgrade dt-trio to open it"
        )
    if version == 1:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _FROM_1:
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    conn.executescript(SCHEMA)
    for table in ("instances", "activities", "entities"):
        conn.execute(
            f"UPDATE {table} SET leased_by = NULL, lease_epoch = NULL WHERE leased_by IS NOT NULL"
        )
