"""A task hub's schema in a PostgreSQL database: its name, its creation and its version.

Each hub has a schema of its own (`dt_trio_<hub>`), made by the first sidecar that opens it,
under a transaction-scoped advisory lock so that sidecars starting together do not race. The
`schema_version` table says which layout the tables have; a newer layout than this code knows
is refused (an older dt-trio must not write tables it does not understand).
"""

from __future__ import annotations

import pathlib
from typing import Any

import psycopg
from psycopg import sql

from dt_trio._errors import StoreUnavailable
from dt_trio._log import get_logger
from dt_trio._store._select import check_hub

log = get_logger(__name__)

SCHEMA_VERSION = 1
_DDL = (pathlib.Path(__file__).parent / "schema.sql").read_text()
# pg_advisory_xact_lock(key1, key2): "dttr" and 1, dt-trio's schema changes in a database.
_LOCK_KEYS = (0x64747472, 1)


def schema_name(hub: str) -> str:
    return f"dt_trio_{check_hub(hub)}"


def ensure_schema(conn: psycopg.Connection[Any], schema: str, creator: str) -> bool:
    """Create the hub's schema and tables if they do not exist, in one transaction under the
    advisory lock; returns whether this call created them. Refuses (StoreUnavailable) a
    schema that holds other tables, or tables of a newer version."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _LOCK_KEYS)
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        if found.fetchone() is None:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        else:
            version = _version(conn, schema)
            if version is not None:
                if version > SCHEMA_VERSION:
                    raise StoreUnavailable(
                        f"the task hub in schema {schema} was made by a newer dt-trio (schema "
                        f"version {version}; this one knows up to {SCHEMA_VERSION}): upgrade "
                        "dt-trio, or give this sidecar another --hub"
                    )
                return False  # version 1 is the only one yet: nothing to migrate
            tables = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = %s", (schema,)
            ).fetchone()
            if tables is not None and tables[0]:
                raise StoreUnavailable(
                    f"the schema {schema} holds tables that are not a dt-trio task hub's (it "
                    "has no schema_version table): give this sidecar another --hub"
                )
        conn.execute(
            sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)),
        )
        conn.execute(_DDL)  # several statements, no parameters: one simple query
        conn.execute(
            "INSERT INTO schema_version (version, created_by) VALUES (%s, %s)",
            (SCHEMA_VERSION, creator),
        )
    log.info("created the task hub schema %s (version %d)", schema, SCHEMA_VERSION)
    return True


def _version(conn: psycopg.Connection[Any], schema: str) -> int | None:
    table = conn.execute(
        "SELECT to_regclass(%s)", (f"{sql.Identifier(schema).as_string(conn)}.schema_version",)
    ).fetchone()
    if table is None or table[0] is None:
        return None
    row = conn.execute(
        sql.SQL("SELECT max(version) FROM {}.schema_version").format(sql.Identifier(schema))
    ).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else None
