"""SQL of durable entities: their rows, queues, leases, queries and cleaning."""

from __future__ import annotations

import functools
import sqlite3

from dt_trio._core import EntityState, EntityStepResult, InboxMessage, lock_is_orphaned
from dt_trio._core._commit import EntityWorkItem, Lease
from dt_trio._store._backend import EntityFilter, Leased
from dt_trio._store._query import Conditions
from dt_trio._store._rows import event, us
from dt_trio._store._sqlite import _instances
from dt_trio._store._sqlite._rows import (
    for_ids,
    lease_next,
    marks,
    next_at,
    read_page,
    to_datetime,
)

_COLUMNS = (
    "instance_id, state, last_modified_at, locked_by, lock_owner, "
    "(SELECT COUNT(*) FROM entity_inbox m WHERE m.instance_id = e.instance_id) AS backlog"
)


def _row_to_entity(row: sqlite3.Row) -> EntityState:
    modified = to_datetime(row["last_modified_at"])
    assert modified is not None
    return EntityState(
        instance_id=row["instance_id"],
        last_modified_at=modified,
        state=row["state"],
        locked_by=row["locked_by"],
        lock_owner=row["lock_owner"],
        backlog=row["backlog"],
    )


def holder(conn: sqlite3.Connection, entity_id: str) -> Lease | None:
    """Who leases the entity, and with which grant (None: nobody, or no such entity)."""
    row = conn.execute(
        "SELECT leased_by, lease_epoch FROM entities WHERE instance_id = ?", (entity_id,)
    ).fetchone()
    return None if row is None or row[0] is None else Lease(row[0], row[1])


def enqueue(conn: sqlite3.Connection, entity_id: str, blob: bytes, visible_us: int) -> None:
    """Queue a message for the entity, which comes into being with its first message."""
    conn.execute(
        "INSERT OR IGNORE INTO entities (instance_id, last_modified_at) VALUES (?, ?)",
        (entity_id, visible_us),
    )
    conn.execute(
        "INSERT INTO entity_inbox (instance_id, event, visible_at) VALUES (?, ?, ?)",
        (entity_id, blob, visible_us),
    )


def write_step(conn: sqlite3.Connection, result: EntityStepResult) -> None:
    """Delete the consumed messages, mark the deferred ones, replace the row (its lease
    cleared, its failed attempts counted from zero) and delete it if it has no state, no
    lock and nothing queued."""
    entity = result.entity
    for_ids(conn, "DELETE FROM entity_inbox WHERE id IN ({})", result.consumed)
    for_ids(conn, "UPDATE entity_inbox SET deferred = 1 WHERE id IN ({})", result.deferred)
    conn.execute(
        "UPDATE entities SET state = ?, last_modified_at = ?, locked_by = ?, lock_owner = ?, "
        "leased_by = NULL, lease_epoch = NULL, failed_attempts = 0 WHERE instance_id = ?",
        (
            entity.state,
            us(entity.last_modified_at),
            entity.locked_by,
            entity.lock_owner,
            entity.instance_id,
        ),
    )
    conn.execute(
        "DELETE FROM entities WHERE instance_id = ? AND state IS NULL "
        "AND locked_by IS NULL AND NOT EXISTS "
        "(SELECT 1 FROM entity_inbox WHERE instance_id = ?)",
        (entity.instance_id, entity.instance_id),
    )


_NEXT_ENTITY = (
    "SELECT MIN(m.visible_at) FROM entity_inbox m JOIN entities e "
    "USING (instance_id) WHERE m.deferred = 0 AND e.leased_by IS NULL"
)


def lease(
    conn: sqlite3.Connection, owner: str, epoch: int, now_us: int, limit: int
) -> Leased[EntityWorkItem]:
    """Lease up to `limit` unleased entities with visible messages that are not deferred."""
    ids = lease_next(
        conn,
        "SELECT m.instance_id FROM entity_inbox m JOIN entities e "
        "USING (instance_id) WHERE m.deferred = 0 AND m.visible_at <= ? "
        "AND e.leased_by IS NULL ORDER BY m.visible_at LIMIT ?",
        "UPDATE entities SET leased_by = ?, lease_epoch = ? WHERE instance_id IN ({marks})",
        owner,
        epoch,
        now_us,
        limit,
    )
    leased: Leased[EntityWorkItem] = Leased()
    if len(ids) < limit:
        leased.next_at = next_at(conn, _NEXT_ENTITY)
    if not ids:
        return leased
    rows = conn.execute(
        f"SELECT {_COLUMNS}, failed_attempts FROM entities e "
        f"WHERE instance_id IN ({marks(len(ids))})",
        ids,
    ).fetchall()
    inboxes: dict[str, list[InboxMessage]] = {i: [] for i in ids}
    for r in conn.execute(
        f"SELECT id, instance_id, event FROM entity_inbox WHERE instance_id IN "
        f"({marks(len(ids))}) AND visible_at <= ? ORDER BY id",
        (*ids, now_us),
    ):
        inboxes[r[1]].append(InboxMessage(r[0], event(r[2])))
    granted = Lease(owner, epoch)
    leased.extend(
        EntityWorkItem(
            _row_to_entity(r), inboxes[r["instance_id"]], granted, r["failed_attempts"] + 1
        )
        for r in rows
    )
    return leased


def get(conn: sqlite3.Connection, entity_id: str) -> EntityState | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM entities e WHERE instance_id = ?", (entity_id,)
    ).fetchone()
    return None if row is None else _row_to_entity(row)


def query(
    conn: sqlite3.Connection, where: EntityFilter, page_size: int, after: str | None
) -> tuple[list[EntityState], str | None]:
    cond = Conditions("?", us)
    cond.add("instance_id > ?", after or "")
    if where.id_prefix:
        cond.add(
            "instance_id >= ? AND instance_id < ?", where.id_prefix, where.id_prefix + "\U0010ffff"
        )
    cond.between("last_modified_at", where.modified_from, where.modified_to)
    if not where.include_transient:
        cond.add("state IS NOT NULL")
    rows, last = read_page(
        conn,
        f"SELECT {_COLUMNS} FROM entities e{cond.where()} ORDER BY instance_id LIMIT ?",
        cond.params,
        page_size,
    )
    return [_row_to_entity(r) for r in rows], last["instance_id"] if last is not None else None


def clean(
    conn: sqlite3.Connection, remove_empty: bool, release_orphaned_locks: bool
) -> tuple[int, int]:
    """Release orphaned locks and delete empty entities; (removed, released)."""
    released = 0
    if release_orphaned_locks:
        history = functools.partial(_instances.history, conn)
        orphans = [
            entity_id
            for entity_id, section, owner, status in conn.execute(
                "SELECT e.instance_id, e.locked_by, e.lock_owner, i.status FROM entities e "
                "LEFT JOIN instances i ON i.instance_id = e.lock_owner "
                "WHERE e.locked_by IS NOT NULL AND e.leased_by IS NULL"
            ).fetchall()
            if lock_is_orphaned(entity_id, section, owner, status, history)
        ]
        for entity_id in orphans:
            conn.execute(
                "UPDATE entities SET locked_by = NULL, lock_owner = NULL WHERE instance_id = ?",
                (entity_id,),
            )
            # What waited for the lock may run now.
            conn.execute("UPDATE entity_inbox SET deferred = 0 WHERE instance_id = ?", (entity_id,))
        released = len(orphans)
    removed = 0
    if remove_empty:
        removed = conn.execute(
            "DELETE FROM entities WHERE state IS NULL AND locked_by IS NULL "
            "AND leased_by IS NULL AND NOT EXISTS "
            "(SELECT 1 FROM entity_inbox m WHERE m.instance_id = entities.instance_id)"
        ).rowcount
    return removed, released
