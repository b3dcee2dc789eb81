"""SQL of orchestration instances and what they own: rows, histories, inboxes (and the rows of
their activities, deleted with them), their leases, queries and purges."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Sequence

from dt_trio._core import InboxMessage, InstanceState, Status, StepResult
from dt_trio._core._commit import Lease, OrchestrationWorkItem
from dt_trio._proto import orchestrator_service_pb2 as pb
from dt_trio._store._backend import FinishedFilter, InstanceFilter, Leased, PageKey
from dt_trio._store._query import Conditions
from dt_trio._store._rows import INSTANCE_COLUMNS, INSTANCE_FIELDS, event, us
from dt_trio._store._sqlite._cache import cache_of
from dt_trio._store._sqlite._rows import (
    FINISHED,
    for_ids,
    insert_rows,
    lease_next,
    marks,
    next_at,
    read_page,
    row_to_state,
    state_values,
)

# -- what guards look at -----------------------------------------------------------------------


def holder(conn: sqlite3.Connection, instance_id: str) -> Lease | None:
    """Who leases the instance, and with which grant (None: nobody, or no such instance)."""
    row = conn.execute(
        "SELECT leased_by, lease_epoch FROM instances WHERE instance_id = ?", (instance_id,)
    ).fetchone()
    return None if row is None or row[0] is None else Lease(row[0], row[1])


def status_and_update(conn: sqlite3.Connection, instance_id: str) -> tuple[Status, int] | None:
    """The instance's status and last update (microseconds), or None if there is none."""
    row = conn.execute(
        "SELECT status, last_updated_at FROM instances WHERE instance_id = ?", (instance_id,)
    ).fetchone()
    return None if row is None else (Status(row[0]), row[1])


def as_found(conn: sqlite3.Connection, instance_id: str, execution_id: str, found_us: int) -> bool:
    """Whether the instance is as a step run ahead of its lease found it: running that
    execution, leased by nobody, unchanged since, with nothing in its inbox."""
    row = conn.execute(
        "SELECT leased_by, last_updated_at, "
        "EXISTS (SELECT 1 FROM inbox WHERE inbox.instance_id = instances.instance_id) "
        "FROM instances WHERE instance_id = ? AND execution_id = ?",
        (instance_id, execution_id),
    ).fetchone()
    return row is not None and row[0] is None and row[1] == found_us and not row[2]


# -- writes ------------------------------------------------------------------------------------


def insert(
    conn: sqlite3.Connection,
    state: InstanceState,
    started: pb.HistoryEvent | None,
    visible_us: int,
) -> int:
    """Insert the instance and, if given, its ExecutionStarted message, visible at
    `visible_us`; returns the message's id (0 without)."""
    conn.execute(
        f"INSERT INTO instances ({INSTANCE_COLUMNS}) VALUES ({marks(INSTANCE_FIELDS)})",
        state_values(state),
    )
    cache = cache_of(conn)
    if cache is not None:
        cache.put(state.instance_id, (state, (), 0))
    if started is None:
        return 0
    cursor = conn.execute(
        "INSERT INTO inbox (instance_id, event, visible_at) VALUES (?, ?, ?)",
        (state.instance_id, started.SerializeToString(), visible_us),
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def delete(conn: sqlite3.Connection, ids: Sequence[str]) -> None:
    """Delete the instances with everything they own."""
    for table in ("history", "inbox", "activities", "instances"):
        conn.executemany(f"DELETE FROM {table} WHERE instance_id = ?", [(i,) for i in ids])
    cache = cache_of(conn)
    if cache is not None:
        for instance_id in ids:
            cache.put(instance_id, None)


def enqueue(
    conn: sqlite3.Connection,
    instance_id: str,
    blob: bytes,
    visible_us: int,
    execution_id: str | None = None,
) -> bool:
    """Put a message into the instance's inbox; whether it was delivered: a message to an
    instance that does not exist (or to an execution that is over) is dropped, as the
    protocol expects."""
    cursor = conn.execute(
        "INSERT INTO inbox (instance_id, event, visible_at) "
        "SELECT instance_id, ?, ? FROM instances WHERE instance_id = ? "
        "AND (? IS NULL OR execution_id = ?)",
        (blob, visible_us, instance_id, execution_id, execution_id),
    )
    return cursor.rowcount == 1


def drop_pending(conn: sqlite3.Connection, instance_id: str) -> None:
    """Delete the instance's inbox and activities."""
    conn.execute("DELETE FROM inbox WHERE instance_id = ?", (instance_id,))
    conn.execute("DELETE FROM activities WHERE instance_id = ?", (instance_id,))


_DROP_ACTIVITIES_OF_ENDING = (
    "DELETE FROM activities WHERE instance_id = ? AND EXISTS (SELECT 1 FROM instances "
    f"WHERE instance_id = ? AND status NOT IN ({','.join(map(str, FINISHED))}))"
)


def write_step(conn: sqlite3.Connection, result: StepResult) -> None:
    """Write a step's history, delete the messages it consumed and replace the instance row
    (its lease cleared, its failed attempts counted from zero). On `reset_history` the old
    history and activities are deleted first; a step that ends the execution deletes the
    activities it was waiting for."""
    state = result.state
    instance_id = state.instance_id
    if result.reset_history:
        conn.execute("DELETE FROM history WHERE instance_id = ?", (instance_id,))
        conn.execute("DELETE FROM activities WHERE instance_id = ?", (instance_id,))
    elif state.status.is_terminal:
        # The step that ends the execution drops the activities it was waiting for, queued
        # or running: nobody waits for them any more. (This step's own are written after it
        # and run, as the SDKs' servers run them; their results are dropped.)
        conn.execute(_DROP_ACTIVITIES_OF_ENDING, (instance_id, instance_id))
    cache = cache_of(conn)
    known = cache.get(instance_id) if cache is not None else None
    blobs = [e.SerializeToString() for e in result.history]
    if result.history:
        if result.reset_history:
            start = 0
        elif known is not None:
            start = len(known[1])
        else:
            start = conn.execute(
                "SELECT COALESCE(MAX(seq), -1) + 1 FROM history WHERE instance_id = ?",
                (instance_id,),
            ).fetchone()[0]
        insert_rows(
            conn,
            "INSERT INTO history (instance_id, seq, event) VALUES",
            [(instance_id, start + i, blob) for i, blob in enumerate(blobs)],
        )
    for_ids(conn, "DELETE FROM inbox WHERE id IN ({})", result.consumed)
    conn.execute(
        f"UPDATE instances SET ({INSTANCE_COLUMNS}) = ({marks(INSTANCE_FIELDS)}), "
        "leased_by = NULL, lease_epoch = NULL, failed_attempts = 0 WHERE instance_id = ?",
        (*state_values(state), instance_id),
    )
    if cache is not None:
        if state.status.is_terminal:
            cache.put(instance_id, state)  # no more steps to serve; the row for readers
        elif result.reset_history:
            cache.put(instance_id, (state, tuple(result.history), sum(map(len, blobs))))
        elif known is not None:
            size = known[2] + sum(map(len, blobs))
            cache.put(instance_id, (state, known[1] + tuple(result.history), size))


def take_inbox(conn: sqlite3.Connection, instance_id: str) -> list[tuple[bytes, int]]:
    """Remove the instance's inbox and return its messages (event, visible_at), in order."""
    arrived = [
        (r[0], r[1])
        for r in conn.execute(
            "SELECT event, visible_at FROM inbox WHERE instance_id = ? ORDER BY id",
            (instance_id,),
        )
    ]
    conn.execute("DELETE FROM inbox WHERE instance_id = ?", (instance_id,))
    return arrived


def put_back(conn: sqlite3.Connection, instance_id: str, arrived: list[tuple[bytes, int]]) -> None:
    """Queue messages taken with `take_inbox` again, behind what is queued now."""
    if arrived:
        insert_rows(
            conn,
            "INSERT INTO inbox (instance_id, event, visible_at) VALUES",
            [(instance_id, blob, visible) for blob, visible in arrived],
        )


def has_inbox(conn: sqlite3.Connection, instance_id: str) -> bool:
    row = conn.execute("SELECT 1 FROM inbox WHERE instance_id = ? LIMIT 1", (instance_id,))
    return row.fetchone() is not None


def reopen(conn: sqlite3.Connection, instance_id: str, now_us: int) -> None:
    """A failed instance runs again (a rewind)."""
    conn.execute(
        "UPDATE instances SET status = ?, output = NULL, failure = NULL, "
        "completed_at = NULL, last_updated_at = ? WHERE instance_id = ?",
        (int(Status.RUNNING), now_us, instance_id),
    )
    cache = cache_of(conn)
    if cache is not None:
        cache.put(instance_id, None)  # read again at the next lease


# -- leases ------------------------------------------------------------------------------------

# When the next message of an unleased instance becomes visible (asked after a short lease).
_NEXT_MESSAGE = (
    "SELECT MIN(m.visible_at) FROM inbox m JOIN instances i USING (instance_id) "
    "WHERE i.leased_by IS NULL"
)


def lease(
    conn: sqlite3.Connection, owner: str, epoch: int, now_us: int, limit: int
) -> Leased[OrchestrationWorkItem]:
    """Lease up to `limit` unleased instances with visible messages, earliest message first."""
    ids = lease_next(
        conn,
        "SELECT m.instance_id FROM inbox m JOIN instances i USING (instance_id) "
        "WHERE m.visible_at <= ? AND i.leased_by IS NULL "
        "ORDER BY m.visible_at LIMIT ?",
        "UPDATE instances SET leased_by = ?, lease_epoch = ? WHERE instance_id IN ({marks})",
        owner,
        epoch,
        now_us,
        limit,
    )
    leased = Leased(load(conn, ids, now_us, Lease(owner, epoch)) if ids else [])
    if len(ids) < limit:
        leased.next_at = next_at(conn, _NEXT_MESSAGE)
    return leased


def take(
    conn: sqlite3.Connection, instance_id: str, lease: Lease, now_us: int
) -> OrchestrationWorkItem | None:
    """Lease the instance if nobody leases it and it has a visible message."""
    taken = conn.execute(
        "UPDATE instances SET leased_by = ?, lease_epoch = ? "
        "WHERE instance_id = ? AND leased_by IS NULL AND EXISTS "
        "(SELECT 1 FROM inbox WHERE inbox.instance_id = ? AND visible_at <= ?)",
        (lease.owner, lease.epoch, instance_id, instance_id, now_us),
    ).rowcount
    return load(conn, [instance_id], now_us, lease)[0] if taken else None


def take_created(conn: sqlite3.Connection, instance_id: str, lease: Lease) -> None:
    """Lease an instance created in this transaction with a visible start."""
    conn.execute(
        "UPDATE instances SET leased_by = ?, lease_epoch = ? WHERE instance_id = ?",
        (lease.owner, lease.epoch, instance_id),
    )


def load(
    conn: sqlite3.Connection, ids: list[str], now_us: int, lease: Lease
) -> list[OrchestrationWorkItem]:
    """The work items of instances just leased: row, history and visible inbox. Rows and
    histories come from the cache where it has them."""
    cache = cache_of(conn)
    known = {i: e for i in ids if cache is not None and (e := cache.get(i)) is not None}
    attempts: dict[str, int] = {}
    states = {i: e[0] for i, e in known.items()}
    histories = {i: list(e[1]) for i, e in known.items()}
    if known:
        attempts.update(
            (r[0], r[1] + 1)
            for r in conn.execute(
                f"SELECT instance_id, failed_attempts FROM instances "
                f"WHERE instance_id IN ({marks(len(ids))})",
                ids,
            )
        )
    missing = [i for i in ids if i not in known]
    if missing:
        unknown = marks(len(missing))
        for r in conn.execute(
            f"SELECT {INSTANCE_COLUMNS}, failed_attempts FROM instances "
            f"WHERE instance_id IN ({unknown})",
            missing,
        ):
            states[r["instance_id"]] = row_to_state(r)
            attempts[r["instance_id"]] = r["failed_attempts"] + 1
        sizes = dict.fromkeys(missing, 0)
        for i in missing:
            histories[i] = []
        for r in conn.execute(
            f"SELECT instance_id, event FROM history WHERE instance_id IN ({unknown}) "
            "ORDER BY instance_id, seq",
            missing,
        ):
            histories[r[0]].append(event(r[1]))
            sizes[r[0]] += len(r[1])
        if cache is not None:
            for i in missing:
                cache.put(i, (states[i], tuple(histories[i]), sizes[i]))
    inboxes: dict[str, list[InboxMessage]] = {i: [] for i in ids}
    for r in conn.execute(
        f"SELECT id, instance_id, event FROM inbox WHERE instance_id IN ({marks(len(ids))}) "
        "AND visible_at <= ? ORDER BY id",
        (*ids, now_us),
    ):
        inboxes[r[1]].append(InboxMessage(r[0], event(r[2])))
    return [
        OrchestrationWorkItem(states[i], histories[i], inboxes[i], lease, attempts[i]) for i in ids
    ]


def read_inbox(conn: sqlite3.Connection, instance_id: str, now_us: int) -> list[InboxMessage]:
    return [
        InboxMessage(r[0], event(r[1]))
        for r in conn.execute(
            "SELECT id, event FROM inbox WHERE instance_id = ? AND visible_at <= ? ORDER BY id",
            (instance_id, now_us),
        )
    ]


# -- reads -------------------------------------------------------------------------------------


def get(conn: sqlite3.Connection, instance_id: str) -> InstanceState | None:
    row = conn.execute(
        f"SELECT {INSTANCE_COLUMNS} FROM instances WHERE instance_id = ?", (instance_id,)
    ).fetchone()
    return row_to_state(row) if row is not None else None


def history(conn: sqlite3.Connection, instance_id: str) -> list[pb.HistoryEvent]:
    return [
        event(r[0])
        for r in conn.execute(
            "SELECT event FROM history WHERE instance_id = ? ORDER BY seq", (instance_id,)
        )
    ]


def _filter_sql(where: InstanceFilter) -> Conditions:
    cond = Conditions("?", us)
    if where.statuses is not None:
        cond.add(f"status IN ({marks(len(where.statuses))})", *map(int, where.statuses))
    cond.between("created_at", where.created_from, where.created_to)
    if where.name is not None:
        cond.add("name = ?", where.name)
    if where.id_prefix:
        # A range on the primary key, so the prefix filter uses the index.
        cond.add(
            "instance_id >= ? AND instance_id < ?", where.id_prefix, where.id_prefix + "\U0010ffff"
        )
    return cond


def query(
    conn: sqlite3.Connection,
    where: InstanceFilter,
    page_size: int,
    after: PageKey | None,
    newest_first: bool = False,
) -> tuple[list[InstanceState], PageKey | None]:
    cond = _filter_sql(where)
    beyond, order = ("<", " DESC") if newest_first else (">", "")
    if after is not None:
        cond.add(f"(created_at, instance_id) {beyond} (?, ?)", *after)
    rows, last = read_page(
        conn,
        f"SELECT {INSTANCE_COLUMNS} FROM instances{cond.where()}"
        f" ORDER BY created_at{order}, instance_id{order} LIMIT ?",
        cond.params,
        page_size,
    )
    next_key = (last["created_at"], last["instance_id"]) if last is not None else None
    return [row_to_state(r) for r in rows], next_key


def count(conn: sqlite3.Connection, where: InstanceFilter) -> dict[Status, int]:
    """How many instances match `where`, per status."""
    cond = _filter_sql(where)
    rows = conn.execute(
        f"SELECT status, COUNT(*) FROM instances{cond.where()} GROUP BY status", cond.params
    ).fetchall()
    return {Status(status): n for status, n in rows}


def list_finished(
    conn: sqlite3.Connection, where: FinishedFilter, page_size: int, after: PageKey | None
) -> tuple[list[str], PageKey | None]:
    allowed = [int(s) for s in where.terminal_statuses]
    if not allowed:
        return [], None
    cond = Conditions("?", us)
    cond.add("completed_at IS NOT NULL")
    cond.add(f"status IN ({marks(len(allowed))})", *allowed)
    cond.between("completed_at", where.completed_from, where.completed_to)
    if after is not None:
        cond.add("(completed_at, instance_id) > (?, ?)", *after)
    # Walk the completion index in order and filter statuses on the way: a page of ids
    # costs the page, not a sort of every finished instance.
    rows, last = read_page(
        conn,
        f"SELECT completed_at, instance_id FROM instances INDEXED BY instances_completed"
        f"{cond.where()} ORDER BY completed_at, instance_id LIMIT ?",
        cond.params,
        page_size,
    )
    return [r[1] for r in rows], (last[0], last[1]) if last is not None else None


# -- purges ------------------------------------------------------------------------------------


def purge(conn: sqlite3.Connection, instance_id: str, recursive: bool) -> int:
    """Delete the instance (and, if `recursive`, its sub-orchestrations at any depth) where
    finished; how many were deleted."""
    ids = [instance_id]
    if recursive:
        ids = [
            r[0]
            for r in conn.execute(
                """
                WITH RECURSIVE tree(id) AS (
                    SELECT ?
                    UNION SELECT i.instance_id FROM instances i
                          JOIN tree ON i.parent_instance_id = tree.id
                )
                SELECT id FROM tree
                """,
                (instance_id,),
            )
        ]
    finished = [
        r[0]
        for r in conn.execute(
            f"SELECT instance_id FROM instances WHERE instance_id IN ({marks(len(ids))}) "
            f"AND status IN ({marks(len(FINISHED))})",
            (*ids, *FINISHED),
        )
    ]
    delete(conn, finished)
    return len(finished)


def purge_some(conn: sqlite3.Connection, where: InstanceFilter, recursive: bool, batch: int) -> int:
    """Delete up to `batch` finished instances matching `where` (and their finished
    sub-orchestrations, if `recursive`); how many were deleted."""
    finished = frozenset(s for s in (where.statuses or Status) if s.is_terminal)
    if not finished:
        return 0
    cond = _filter_sql(dataclasses.replace(where, statuses=finished))
    select = f"SELECT instance_id FROM instances{cond.where()} LIMIT ?"
    ids = [r[0] for r in conn.execute(select, (*cond.params, batch))]
    if recursive:
        ids = _with_finished_descendants(conn, ids)
    delete(conn, ids)
    return len(ids)


def _with_finished_descendants(conn: sqlite3.Connection, ids: Sequence[str]) -> list[str]:
    """`ids` and their sub-orchestrations, at any depth, that are finished."""
    found = list(ids)
    frontier = list(ids)
    while frontier:
        chunk, frontier = frontier[:500], frontier[500:]
        children = [
            r[0]
            for r in conn.execute(
                f"SELECT instance_id FROM instances WHERE parent_instance_id IN "
                f"({marks(len(chunk))}) AND status IN ({marks(len(FINISHED))})",
                (*chunk, *FINISHED),
            )
        ]
        found += children
        frontier += children
    return list(dict.fromkeys(found))  # a child may also have matched the filter itself


def delete_everything(conn: sqlite3.Connection) -> None:
    for table in ("history", "inbox", "activities", "instances", "entity_inbox", "entities"):
        conn.execute(f"DELETE FROM {table}")
    cache = cache_of(conn)
    if cache is not None:
        cache.forget_all()
