"""How the sqlite store writes values: times as integer microseconds, instance rows, and
bulk statements of many rows each."""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from dt_trio._core import Status
from dt_trio._core._commit import Attempts, Lease
from dt_trio._store import _rows
from dt_trio._store._query import split_page
from dt_trio._store._rows import us

FINISHED = tuple(int(s) for s in Status if s.is_terminal)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_datetime(us: int | None) -> datetime | None:
    if us is None:
        return None
    return _EPOCH + timedelta(microseconds=us)


# The values of INSTANCE_COLUMNS for a state, and the state of a row that starts with them
# (partials: no call more than the shared functions', on every step's commit).
state_values = functools.partial(_rows.state_values, time=us, tags=json.dumps)
row_to_state = functools.partial(_rows.state_of, time=_rows.from_us, tags=json.loads)


# Rows per statement of a bulk write (at most 6 parameters a row: well under sqlite's limit of
# 32,766 parameters a statement).
ROWS_PER_STATEMENT = 500


def read_page(
    conn: sqlite3.Connection, sql: str, params: Sequence[object], page_size: int
) -> tuple[list[sqlite3.Row], sqlite3.Row | None]:
    """A page of `sql`'s rows (a statement that ends in `LIMIT ?`), at most `page_size`, and
    its last row if another page follows."""
    return split_page(conn.execute(sql, (*params, page_size + 1)).fetchall(), page_size)


def marks(count: int) -> str:
    """`count` placeholders, comma-separated."""
    return ",".join("?" * count)


@functools.lru_cache(maxsize=128)
def _placeholders(width: int, count: int) -> str:
    row = "?" if width == 1 else f"({marks(width)})"
    return ",".join([row] * count)


def insert_rows(conn: sqlite3.Connection, into: str, rows: Sequence[tuple[object, ...]]) -> int:
    """Insert `rows` with `into` ("INSERT INTO t (a, b) VALUES") in statements of many rows.

    One statement is one sqlite call, and the writer's thread gives up the GIL once per call:
    row by row (`executemany` included) it waits to get it back after every row while the
    event loop's thread is busy, which made a step scheduling 1,000 activities commit in about
    40 ms under load instead of 8. Returns the last row's rowid (0 without rows): the rows of
    an AUTOINCREMENT table get consecutive ids, in order."""
    last = 0
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[start : start + ROWS_PER_STATEMENT]
        cursor = conn.execute(
            f"{into} {_placeholders(len(chunk[0]), len(chunk))}",
            [value for row in chunk for value in row],
        )
        assert cursor.lastrowid is not None
        last = cursor.lastrowid
    return last


def for_ids(
    conn: sqlite3.Connection, sql: str, ids: Sequence[int], before: tuple[object, ...] = ()
) -> None:
    """Run `sql` ("... WHERE id IN ({})", after the parameters `before`) for all `ids`, in
    statements of many ids (see `insert_rows`)."""
    for start in range(0, len(ids), ROWS_PER_STATEMENT):
        chunk = ids[start : start + ROWS_PER_STATEMENT]
        conn.execute(sql.format(_placeholders(1, len(chunk))), (*before, *chunk))


# How a release changes a row's count of failed attempts (see `Attempts`): fixed fragments.
ATTEMPTS_SQL = {
    Attempts.KEEP: "failed_attempts",
    Attempts.COUNT: "failed_attempts + 1",
    Attempts.RESET: "0",
}


def release_lease(
    conn: sqlite3.Connection,
    table: str,
    inbox: str,
    key: str,
    lease: Lease,
    attempts: Attempts,
    message_ids: Sequence[int],
    until_us: int | None,
) -> None:
    """Clear the lease of row `key` of `table` (instances, entities) if it is still `lease`;
    its `message_ids` in `inbox` become visible at `until_us` (None: as they are)."""
    released = conn.execute(
        f"UPDATE {table} SET leased_by = NULL, lease_epoch = NULL, "
        f"failed_attempts = {ATTEMPTS_SQL[attempts]} "
        "WHERE instance_id = ? AND leased_by = ? AND lease_epoch = ?",
        (key, lease.owner, lease.epoch),
    ).rowcount
    if released and until_us is not None:
        for_ids(
            conn, f"UPDATE {inbox} SET visible_at = ? WHERE id IN ({{}})", message_ids, (until_us,)
        )


def lease_next(
    conn: sqlite3.Connection,
    pick: str,
    lease: str,
    owner: str,
    epoch: int,
    now_us: int,
    limit: int,
) -> list[str]:
    """Lease the first `limit` distinct unleased owners of visible messages, in time order.

    `pick` walks the visible messages by visible_at (an index) and names their owners; a few
    extra rows cover owners with several messages waiting. `lease` marks the chosen ones
    (its `{marks}` becomes their placeholders). Both are fixed statements of this package."""
    ids = list(dict.fromkeys(r[0] for r in conn.execute(pick, (now_us, limit * 4))))[:limit]
    if ids:
        conn.execute(lease.format(marks=marks(len(ids))), (owner, epoch, *ids))
    return ids


def next_at(conn: sqlite3.Connection, sql: str) -> datetime | None:
    """The time `sql` (a fixed statement: the earliest time of something) answers."""
    return to_datetime(conn.execute(sql).fetchone()[0])
