"""SQL of activities as work: added by steps, leased, released, deleted with their result."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from dt_trio._core import ActivityTask
from dt_trio._core._commit import ActivityWorkItem, Attempts, Lease
from dt_trio._store._backend import Leased
from dt_trio._store._rows import event
from dt_trio._store._sqlite._rows import ATTEMPTS_SQL, insert_rows, marks, next_at


def holder(conn: sqlite3.Connection, activity_id: int) -> Lease | None:
    """Who leases the activity, and with which grant (None: nobody, or no such activity)."""
    row = conn.execute(
        "SELECT leased_by, lease_epoch FROM activities WHERE id = ?", (activity_id,)
    ).fetchone()
    return None if row is None or row[0] is None else Lease(row[0], row[1])


def add(
    conn: sqlite3.Connection,
    activities: Sequence[ActivityTask],
    now_us: int,
    lease: Lease | None = None,
    count: int = 0,
) -> list[ActivityWorkItem]:
    """Add a step's activities, visible at `now_us`; the first `count` are leased with
    `lease` as they are written, and their work items returned (a hand-over)."""
    handed = activities[:count] if lease is not None else []
    leased: list[ActivityWorkItem] = []
    if handed:
        assert lease is not None
        last = insert_rows(
            conn,
            "INSERT INTO activities "
            "(instance_id, execution_id, event, visible_at, leased_by, lease_epoch) VALUES",
            [
                (
                    a.instance_id,
                    a.execution_id,
                    a.scheduled.SerializeToString(),
                    now_us,
                    lease.owner,
                    lease.epoch,
                )
                for a in handed
            ],
        )
        first = last - len(handed) + 1
        leased = [
            ActivityWorkItem(first + i, a.instance_id, a.execution_id, a.scheduled, lease)
            for i, a in enumerate(handed)
        ]
    if len(activities) > len(handed):
        insert_rows(
            conn,
            "INSERT INTO activities (instance_id, execution_id, event, visible_at) VALUES",
            [
                (a.instance_id, a.execution_id, a.scheduled.SerializeToString(), now_us)
                for a in activities[len(handed) :]
            ],
        )
    return leased


def delete(conn: sqlite3.Connection, activity_id: int, lease: Lease | None = None) -> bool:
    """Delete the activity (only if it is still leased with `lease`, if given); whether it
    was deleted."""
    if lease is None:
        cursor = conn.execute("DELETE FROM activities WHERE id = ?", (activity_id,))
    else:
        cursor = conn.execute(
            "DELETE FROM activities WHERE id = ? AND leased_by = ? AND lease_epoch = ?",
            (activity_id, lease.owner, lease.epoch),
        )
    return cursor.rowcount == 1


def release(
    conn: sqlite3.Connection,
    activity_id: int,
    lease: Lease,
    attempts: Attempts,
    visible_us: int,
) -> None:
    """Clear the activity's lease if it is still `lease`; it is visible from `visible_us`."""
    conn.execute(
        "UPDATE activities SET leased_by = NULL, lease_epoch = NULL, visible_at = ?, "
        f"failed_attempts = {ATTEMPTS_SQL[attempts]} "
        "WHERE id = ? AND leased_by = ? AND lease_epoch = ?",
        (visible_us, activity_id, lease.owner, lease.epoch),
    )


_NEXT_ACTIVITY = "SELECT MIN(visible_at) FROM activities WHERE leased_by IS NULL"


def lease(
    conn: sqlite3.Connection, owner: str, epoch: int, now_us: int, limit: int
) -> Leased[ActivityWorkItem]:
    """Lease up to `limit` visible activities, oldest first."""
    rows = conn.execute(
        "SELECT id, instance_id, execution_id, event, failed_attempts FROM activities "
        "WHERE leased_by IS NULL AND visible_at <= ? ORDER BY visible_at, id LIMIT ?",
        (now_us, limit),
    ).fetchall()
    if rows:
        conn.execute(
            "UPDATE activities SET leased_by = ?, lease_epoch = ? "
            f"WHERE id IN ({marks(len(rows))})",
            (owner, epoch, *(r["id"] for r in rows)),
        )
    granted = Lease(owner, epoch)
    leased = Leased(
        ActivityWorkItem(
            id=r["id"],
            instance_id=r["instance_id"],
            execution_id=r["execution_id"],
            scheduled=event(r["event"]),
            lease=granted,
            attempt=r["failed_attempts"] + 1,
        )
        for r in rows
    )
    if len(rows) < limit:
        leased.next_at = next_at(conn, _NEXT_ACTIVITY)
    return leased
