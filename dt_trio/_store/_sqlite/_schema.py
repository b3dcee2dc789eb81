"""The sqlite store's schema: a database checked to be a store, the schema created on a new
store and migrated on an older one."""

from __future__ import annotations

import pathlib
import sqlite3

from dt_trio._errors import StoreUnavailable

SCHEMA = (pathlib.Path(__file__).parent / "schema.sql").read_text()
# The schema version this code writes and reads (PRAGMA user_version), and the mark of a
# dt-trio store (PRAGMA application_id: "dttr").
SCHEMA_VERSION = 2
APPLICATION_ID = 0x64747472
_TABLES = frozenset(
    {"instances", "history", "inbox", "activities", "entities", "entity_inbox", "sqlite_sequence"}
)
# The columns of `instances` that tell a store of each version from another program's table.
_INSTANCE_COLUMNS = {
    1: {"instance_id", "execution_id", "status", "locked_by", "dequeue_count"},
    2: {"instance_id", "execution_id", "status", "leased_by", "failed_attempts", "lease_epoch"},
}

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


def check_is_store(conn: sqlite3.Connection, path: str) -> None:
    """Refuse, before anything is written, a database that is neither empty nor a dt-trio
    store: another program's tables are never touched, nor its user_version or journal mode.

    A store is marked by its application_id; stores made before the mark are recognised by
    their tables (and get the mark with the schema)."""
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    objects = conn.execute("SELECT type, name FROM sqlite_schema").fetchall()
    if application_id == APPLICATION_ID:
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"the store {path} has schema version {version}, made by a newer dt-trio "
                f"(this one knows versions up to {SCHEMA_VERSION}); run that version on it"
            )
        return
    if application_id == 0 and version == 0 and not objects:
        return  # empty: a new store
    tables = sorted(name for kind, name in objects if kind == "table")
    if application_id == 0 and _is_unmarked_store(conn, version, tables):
        return
    held = f"the tables {', '.join(tables[:10])}" if tables else "no table"
    if len(tables) > 10:
        held += f" and {len(tables) - 10} more"
    raise StoreUnavailable(
        f"{path} is an sqlite database of another program, not a dt-trio store (it has "
        f"{held}; application_id {application_id}, user_version {version}); dt-trio leaves "
        "it unchanged: give --db a new file or a dt-trio store"
    )


def _is_unmarked_store(conn: sqlite3.Connection, version: int, tables: list[str]) -> bool:
    if version not in _INSTANCE_COLUMNS or "instances" not in tables or not set(tables) <= _TABLES:
        return False
    columns = {row[1] for row in conn.execute("PRAGMA table_info(instances)")}
    return _INSTANCE_COLUMNS[version] <= columns


def prepare(conn: sqlite3.Connection) -> None:
    """Bring the store to this version's schema, and void the leases of the process that
    had it before: one process owns a store, so they are nobody's now."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
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
