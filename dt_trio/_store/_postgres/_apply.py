"""A `Commit` applied in one PostgreSQL transaction: its guards, its writes, its takes.

Runs in a worker thread on a connection inside a transaction (see `_store`). Statements are
few and set-based (arrays in, one statement per table and purpose) and always parameterised.

Readiness: an instance's `ready_at` (an entity's, over its messages that are not deferred) is
the earliest visible_at of its queue. Whoever adds to a queue lowers it with LEAST in the same
statement that locks the row; whoever removes from a queue recomputes it in a statement that
runs after the row is locked (a guard's SELECT ... FOR UPDATE, or an earlier UPDATE of the
transaction), so that the recomputation sees every message committed before the lock: under
READ COMMITTED a statement that waits for a row lock re-reads that row, not other tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg

from dt_trio._core import (
    ActivityTask,
    EntityStepResult,
    InboxMessage,
    NewInstance,
    OutboundMessage,
    Status,
    StepResult,
    is_entity_id,
)
from dt_trio._core._commit import (
    ActivityWorkItem,
    Applied,
    AsFound,
    Attempts,
    Commit,
    Creatable,
    CreateInstance,
    DeleteActivity,
    DropPending,
    Exists,
    Guard,
    Holds,
    InStatus,
    Lease,
    OrchestrationWorkItem,
    Release,
    Reopen,
    Send,
    Take,
    TakeActivities,
    TakeInstance,
    Unchanged,
    WorkKind,
    Write,
    WriteEntityStep,
    WriteStep,
)
from dt_trio._errors import (
    DtTrioError,
    FailedPrecondition,
    InstanceExists,
    InstanceNotFound,
    LockLost,
)
from dt_trio._log import get_logger
from dt_trio._store._postgres._arrays import BigintArray, ByteaArray, TextArray, TimestamptzArray
from dt_trio._store._postgres._rows import (
    INSTANCE_COLUMNS,
    INSTANCE_FIELDS,
    event,
    state_values,
    to_state,
    utc,
)

log = get_logger(__name__)

TERMINAL = [int(s) for s in Status if s.is_terminal]

# (table, key column) of each kind's leased rows
LEASED_TABLE = {
    WorkKind.ORCHESTRATION: ("instances", "instance_id"),
    WorkKind.ACTIVITY: ("activities", "id"),
    WorkKind.ENTITY: ("entities", "instance_id"),
}

# An orchestration's row as a lease returns it (from `instances i`): the row, the lease's epoch,
# the failed attempts.
LEASED_INSTANCE = (
    f"{', '.join('i.' + c.strip() for c in INSTANCE_COLUMNS.split(','))}, i.lease_epoch, i.attempts"
)
# The histories and visible inboxes (ids, events) of instances, in a statement of its own
# after their lease: a statement that waited for a row lock sees that row as it is now, but
# other tables as they were when it began (READ COMMITTED), so the lease's own statement could
# read a history without the step the previous holder just committed.
_LOAD = """
    SELECT
        ARRAY(SELECT h.event FROM history h WHERE h.instance_id = l.id ORDER BY h.seq),
        ARRAY(SELECT m.id FROM inbox m WHERE m.instance_id = l.id AND m.visible_at <= %s
            ORDER BY m.id),
        ARRAY(SELECT m.event FROM inbox m WHERE m.instance_id = l.id AND m.visible_at <= %s
            ORDER BY m.id)
    FROM unnest(%s::text[]) WITH ORDINALITY AS l(id, ord) ORDER BY l.ord
"""


def load_orchestrations(
    tx: Tx, rows: Sequence[Sequence[Any]], owner: str
) -> list[OrchestrationWorkItem]:
    """The work items of instances just leased, from their rows (LEASED_INSTANCE)."""
    if not rows:
        return []
    now = utc(tx.now)
    n = INSTANCE_FIELDS
    loaded = tx.run(_LOAD, (now, now, [r[0] for r in rows])).fetchall()
    items = []
    for row, (history, ids, events) in zip(rows, loaded, strict=True):
        item = OrchestrationWorkItem(
            state=to_state(row),
            history=[event(e) for e in history],
            inbox=[InboxMessage(i, event(e)) for i, e in zip(ids, events, strict=True)],
            lease=Lease(owner, row[n]),
            attempt=row[n + 1] + 1,
        )
        tx.taken.append((WorkKind.ORCHESTRATION, row[0], item.lease, len(item.history)))
        items.append(item)
    return items


@dataclass
class Tx:
    """One transaction of a commit: its connection and time, what the process knows of the
    leases it holds, and what the transaction does to them (for the store's renewals)."""

    conn: psycopg.Connection[Any]
    now: datetime
    ttl: timedelta
    # the history length each held instance had when this process leased it: where its step
    # is written, so that a second writer of the same step hits the history's key
    history_at: Mapping[str, int]
    taken: list[tuple[WorkKind, str | int, Lease, int]] = field(default_factory=list)
    released: list[tuple[WorkKind, str | int]] = field(default_factory=list)
    created: set[str] = field(default_factory=set)  # instances inserted by this transaction
    existing: set[str] = field(default_factory=set)  # instances a Creatable guard found
    dropped: int = 0
    steps: int = 0  # orchestration steps written (counted for the bench)
    functions: bool = True  # write steps with the schema's write_step (see PostgresBackend)

    def run(
        self, query: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> psycopg.Cursor[Any]:
        cursor = self.conn.cursor(binary=True)
        cursor.execute(query, params)
        return cursor


def apply(tx: Tx, commit: Commit) -> Applied:
    """Apply `commit` in the transaction (its `otherwise` if a guard fails); raises the failed
    guard's error when there is no `otherwise` (the caller rolls back)."""
    failed = _first_failure(tx, commit.guards)
    if failed is not None:
        if commit.otherwise is None:
            raise failed
        return dataclasses.replace(apply(tx, commit.otherwise), alternative=True)
    take_activities = next((t for t in commit.take if isinstance(t, TakeActivities)), None)
    activities: list[ActivityWorkItem] = []
    waiting = False
    for write in commit.writes:
        if isinstance(write, WriteStep):
            handed, waiting = _write_step(tx, write.result, take_activities)
            activities += handed
        elif isinstance(write, CreateInstance):
            _create_instance(tx, write)
        elif isinstance(write, Send):
            send(tx, write.messages)
        elif isinstance(write, DropPending):
            _drop_pending(tx, write.instance_id)
        elif isinstance(write, DeleteActivity):
            tx.run("DELETE FROM activities WHERE id = %s", (write.activity_id,))
            tx.released.append((WorkKind.ACTIVITY, write.activity_id))
        elif isinstance(write, WriteEntityStep):
            _write_entity_step(tx, write.result)
        elif isinstance(write, Reopen):
            tx.run(
                "UPDATE instances SET status = %s, output = NULL, failure = NULL, "
                "completed_at = NULL, last_updated_at = %s WHERE instance_id = %s",
                (int(Status.RUNNING), utc(tx.now), write.instance_id),
            )
        elif isinstance(write, Release):
            _release(tx, write)
        else:  # pragma: no cover - the union is closed
            raise TypeError(f"unknown write {write!r}")
    orchestrations = [
        item
        for take in commit.take
        if isinstance(take, TakeInstance)
        and (item := _take_instance(tx, take.owner, take.instance_id)) is not None
    ]
    return Applied(
        orchestrations=tuple(orchestrations),
        activities=tuple(activities),
        waiting=waiting,
        dropped=tx.dropped,
    )


@dataclass(frozen=True)
class Call:
    """A commit as one statement of a function of the schema: the statement, and what makes
    the row it answers the commit's `Applied` (raising LockLost when the lease was not held:
    the function then wrote nothing). Sent alone, or pipelined with others (see `_store`)."""

    query: str
    params: Sequence[Any]
    finish: Callable[[Sequence[Any]], Applied]

    def run(self, tx: Tx) -> Applied:
        row = tx.run(self.query, self.params).fetchone()
        assert row is not None
        return self.finish(row)


def one_call(commit: Commit) -> Callable[[Tx], Call] | None:
    """`commit` as one call of a function of the schema, when it has the shape of one (the
    commits the engine makes most): a step under its instance's lease (write_step), an
    activity's result under the activity's lease, with the instance taken or not (deliver),
    or a start. The call refuses (LockLost), having written nothing, when the lease is not
    held. Made for a transaction (`Tx`), whose time and leases its parameters use."""
    if commit.otherwise is not None or len(commit.guards) != 1:
        return None
    guard = commit.guards[0]
    writes, takes = commit.writes, commit.take
    if isinstance(guard, Creatable):
        return _start_call(guard, writes, takes)
    if not isinstance(guard, Holds):
        return None
    if guard.kind is WorkKind.ORCHESTRATION:
        if len(writes) != 1 or not isinstance(writes[0], WriteStep):
            return None
        result = writes[0].result
        if (
            result.state.instance_id != guard.key
            or result.reset_history
            or result.new_instances
            or not all(isinstance(t, TakeActivities) for t in takes)
        ):
            return None
        take = next((t for t in takes if isinstance(t, TakeActivities)), None)

        def step(tx: Tx) -> Call:
            query, params, written = _step_call(tx, result, take, guard.lease)

            def finish(row: Sequence[Any]) -> Applied:
                handed = written(row)
                if handed is None:
                    raise _lost(guard)
                activities, waiting = handed
                return Applied(activities=tuple(activities), waiting=waiting, dropped=tx.dropped)

            return Call(query, params, finish)

        return step
    if guard.kind is not WorkKind.ACTIVITY or len(writes) != 2:
        return None
    delete, send_it = writes
    if (
        not isinstance(delete, DeleteActivity)
        or delete.activity_id != guard.key
        or not isinstance(send_it, Send)
        or len(send_it.messages) != 1
    ):
        return None
    message = send_it.messages[0]
    target = message.target_instance_id
    if is_entity_id(target) or message.execution_id is None:
        return None
    owner: str | None = None
    if takes:
        if len(takes) != 1 or not isinstance(takes[0], TakeInstance):
            return None
        if takes[0].instance_id != target:
            return None
        owner = takes[0].owner

    def deliver(tx: Tx) -> Call:
        now = utc(tx.now)

        def finish(row: Sequence[Any]) -> Applied:
            held, delivered = row[0], row[1]
            if not held:
                raise _lost(guard)
            tx.released.append((WorkKind.ACTIVITY, guard.key))
            if not delivered:
                return Applied(dropped=1)
            if owner is None or row[2] is None:
                return Applied()
            taken = _taken(tx, row[2:], owner)
            return Applied(orchestrations=(taken,))

        return Call(
            "SELECT * FROM deliver(%s::bigint, %s::text, %s::bigint, %s::text, %s::text, "
            "%s::bytea, %s::timestamptz, %s::text, %s::interval, %s::timestamptz)",
            (
                guard.key,
                guard.lease.owner,
                guard.lease.epoch,
                target,
                message.execution_id,
                message.event.SerializeToString(),
                utc(message.visible_at) if message.visible_at else now,
                owner,
                tx.ttl,
                now,
            ),
            finish,
        )

    return deliver


def _start_call(
    guard: Creatable, writes: Sequence[Write], takes: Sequence[Take]
) -> Callable[[Tx], Call] | None:
    """A start (Creatable, CreateInstance with its message, the instance taken or not) as
    one call of the schema's start."""
    if len(writes) != 1 or not isinstance(writes[0], CreateInstance):
        return None
    create = writes[0]
    state, started = create.state, create.started
    if started is None or state.instance_id != guard.instance_id:
        return None
    owner: str | None = None
    if takes:
        if len(takes) != 1 or not isinstance(takes[0], TakeInstance):
            return None
        if takes[0].instance_id != state.instance_id:
            return None
        owner = takes[0].owner

    def start(tx: Tx) -> Call:
        def finish(row: Sequence[Any]) -> Applied:
            status, message, epoch = row
            if status is not None:
                raise InstanceExists(state.instance_id, Status(status).label)
            tx.created.add(state.instance_id)
            if epoch is None:
                return Applied()
            assert owner is not None
            lease = Lease(owner, epoch)
            tx.taken.append((WorkKind.ORCHESTRATION, state.instance_id, lease, 0))
            item = OrchestrationWorkItem(state, [], [InboxMessage(message, started)], lease)
            return Applied(orchestrations=(item,))

        return Call(
            "SELECT * FROM start(%s::smallint[], %s::text, %s::text, %s::text, %s::text, "
            "%s::smallint, %s::text, %s::text, %s::text, %s::bytea, %s::timestamptz, "
            "%s::timestamptz, %s::timestamptz, %s::timestamptz, %s::text, %s::jsonb, %s::bytea, "
            "%s::bytea, %s::timestamptz, %s::text, %s::interval, %s::timestamptz)",
            (
                [int(s) for s in guard.replaceable],
                *state_values(state),
                started.SerializeToString(),
                utc(create.visible_at),
                owner,
                tx.ttl,
                utc(tx.now),
            ),
            finish,
        )

    return start


def _lost(guard: Holds) -> LockLost:
    return LockLost(
        f"{_describe(guard.kind, guard.key)} is no longer leased by {guard.lease.owner}"
    )


def _taken(tx: Tx, row: Sequence[Any], owner: str) -> OrchestrationWorkItem:
    """The work item of an instance a function leased: its columns, epoch, attempts, history
    and inbox (ids, events)."""
    n = INSTANCE_FIELDS
    item = OrchestrationWorkItem(
        state=to_state(row),
        history=[event(e) for e in row[n + 2]],
        inbox=[InboxMessage(i, event(e)) for i, e in zip(row[n + 3], row[n + 4], strict=True)],
        lease=Lease(owner, row[n]),
        attempt=row[n + 1] + 1,
    )
    tx.taken.append((WorkKind.ORCHESTRATION, item.state.instance_id, item.lease, len(item.history)))
    return item


# -- guards -----------------------------------------------------------------------------------


def _first_failure(tx: Tx, guards: Sequence[Guard]) -> DtTrioError | None:
    for guard in guards:
        failure = _check(tx, guard)
        if failure is not None:
            return failure
    return None


def _check(tx: Tx, guard: Guard) -> DtTrioError | None:
    """None if `guard` holds; the error it fails with otherwise. Rows a guard reads are
    locked (FOR UPDATE): what it checked stays true until the transaction ends."""
    if isinstance(guard, Holds):
        table, key = LEASED_TABLE[guard.kind]
        held = tx.run(
            f"SELECT 1 FROM {table} WHERE {key} = %s AND lease_owner = %s AND lease_epoch = %s "
            "FOR UPDATE",
            (guard.key, guard.lease.owner, guard.lease.epoch),
        ).fetchone()
        if held is None:
            return LockLost(
                f"{_describe(guard.kind, guard.key)} is no longer leased by {guard.lease.owner}"
            )
        return None
    if isinstance(guard, AsFound):
        row = tx.run(
            "SELECT lease_owner IS NULL AND last_updated_at = %s AND ready_at IS NULL "
            "FROM instances WHERE instance_id = %s AND execution_id = %s FOR UPDATE",
            (utc(guard.last_updated_at), guard.instance_id, guard.execution_id),
        ).fetchone()
        if row is None or not row[0]:
            return LockLost(f"instance '{guard.instance_id}' changed since its step ran ahead")
        return None
    if isinstance(guard, Creatable):
        row = tx.run(
            "SELECT status FROM instances WHERE instance_id = %s FOR UPDATE", (guard.instance_id,)
        ).fetchone()
        if row is None:
            return None
        tx.existing.add(guard.instance_id)
        if Status(row[0]) in guard.replaceable:
            return None
        return InstanceExists(guard.instance_id, Status(row[0]).label)
    if isinstance(guard, Exists):
        row = tx.run(
            "SELECT 1 FROM instances WHERE instance_id = %s", (guard.instance_id,)
        ).fetchone()
        return InstanceNotFound(guard.instance_id) if row is None else None
    if isinstance(guard, InStatus):
        row = tx.run(
            "SELECT status FROM instances WHERE instance_id = %s FOR UPDATE", (guard.instance_id,)
        ).fetchone()
        if row is None:
            return InstanceNotFound(guard.instance_id)
        if row[0] != int(guard.status):
            return FailedPrecondition(
                f"instance '{guard.instance_id}' is {Status(row[0]).label}; {guard.why}"
            )
        return None
    if isinstance(guard, Unchanged):
        row = tx.run(
            "SELECT status, last_updated_at FROM instances WHERE instance_id = %s FOR UPDATE",
            (guard.instance_id,),
        ).fetchone()
        if row is None or row[0] in TERMINAL or row[1] != utc(guard.last_updated_at):
            return FailedPrecondition(
                f"instance '{guard.instance_id}' changed or finished since it was read"
            )
        return None
    raise TypeError(f"unknown guard {guard!r}")  # pragma: no cover - the union is closed


def _describe(kind: WorkKind, key: str | int) -> str:
    if kind is WorkKind.ACTIVITY:
        return f"activity work item {key}"
    return f"{'entity' if kind is WorkKind.ENTITY else 'instance'} '{key}'"


# -- writes -----------------------------------------------------------------------------------


def delete_instances(tx: Tx, ids: Sequence[str]) -> None:
    """Delete instances with their history, inbox and activities."""
    if not ids:
        return
    for table in ("history", "inbox", "activities", "instances"):
        tx.run(f"DELETE FROM {table} WHERE instance_id = ANY(%s::text[])", (list(ids),))


def _insert_instance(tx: Tx, new: CreateInstance) -> None:
    state = new.state
    ready = utc(new.visible_at) if new.started is not None else None
    tx.run(
        f"INSERT INTO instances ({INSTANCE_COLUMNS}, ready_at) "
        f"VALUES ({', '.join(['%s'] * INSTANCE_FIELDS)}, %s)",
        (*state_values(state), ready),
    )
    tx.created.add(state.instance_id)
    if new.started is not None:
        tx.run(
            "INSERT INTO inbox (instance_id, event, visible_at) VALUES (%s, %s, %s)",
            (state.instance_id, new.started.SerializeToString(), ready),
        )


def _create_instance(tx: Tx, new: CreateInstance) -> None:
    if new.state.instance_id in tx.existing:  # its guard allowed replacing it
        delete_instances(tx, [new.state.instance_id])
        tx.existing.discard(new.state.instance_id)
    _insert_instance(tx, new)


def send(tx: Tx, messages: Sequence[OutboundMessage]) -> None:
    """Deliver messages: to orchestrations (dropped, and counted, when the instance or the
    execution they name is gone) and to entities (which come into being with them)."""
    now = utc(tx.now)
    to_instances = [m for m in messages if not is_entity_id(m.target_instance_id)]
    to_entities = [m for m in messages if is_entity_id(m.target_instance_id)]
    if to_instances:
        row = tx.run(
            "SELECT send_to_instances(%s, %s, %s, %s)",
            (
                TextArray(m.target_instance_id for m in to_instances),
                ByteaArray(m.event.SerializeToString() for m in to_instances),
                TimestamptzArray(utc(m.visible_at) if m.visible_at else now for m in to_instances),
                TextArray(m.execution_id for m in to_instances),
            ),
        ).fetchone()
        delivered = row[0] if row is not None else 0
        tx.dropped += len(to_instances) - delivered
    if to_entities:
        tx.run(
            "SELECT send_to_entities(%s, %s, %s)",
            (
                TextArray(m.target_instance_id for m in to_entities),
                ByteaArray(m.event.SerializeToString() for m in to_entities),
                TimestamptzArray(utc(m.visible_at) if m.visible_at else now for m in to_entities),
            ),
        )


def _start_instances(tx: Tx, new_instances: Sequence[NewInstance]) -> None:
    """Create the instances a step starts; an existing one that may not be replaced gets the
    `on_conflict` message instead (or nothing)."""
    if not new_instances:
        return
    ids = [n.state.instance_id for n in new_instances]
    found = dict(
        tx.run(
            "SELECT instance_id, status FROM instances WHERE instance_id = ANY(%s::text[]) "
            "ORDER BY instance_id FOR UPDATE",
            (ids,),
        ).fetchall()
    )
    conflicts: list[OutboundMessage] = []
    for new in new_instances:
        instance_id = new.state.instance_id
        status = found.get(instance_id)
        if status is not None and (not new.replace_finished or status not in TERMINAL):
            if new.on_conflict is not None:
                conflicts.append(new.on_conflict)
            else:
                log.info("%s exists; the start asked for by an entity is dropped", instance_id)
            continue
        if status is not None:
            delete_instances(tx, [instance_id])
        _insert_instance(
            tx,
            CreateInstance(
                new.state, new.started, new.state.scheduled_start_at or new.state.created_at
            ),
        )
        found[instance_id] = int(new.state.status)
    send(tx, conflicts)


def _history_start(tx: Tx, instance_id: str) -> int | None:
    """Where a step's history goes: the length its lease read (see `Tx.history_at`), 0 for an
    instance this transaction created, otherwise None: after what the store has."""
    if instance_id in tx.history_at:
        return tx.history_at[instance_id]
    if instance_id in tx.created:
        return 0
    return None


def _write_step(
    tx: Tx, result: StepResult, take: TakeActivities | None
) -> tuple[list[ActivityWorkItem], bool]:
    """Write one orchestration step (see `WriteStep`); the activities it leased and whether
    the instance has messages after it."""
    if tx.functions and not (result.reset_history or result.new_instances):
        return _write_one_step(tx, result, take)
    tx.steps += 1
    state = result.state
    instance_id = state.instance_id
    if result.reset_history:
        tx.run("DELETE FROM history WHERE instance_id = %s", (instance_id,))
        tx.run("DELETE FROM activities WHERE instance_id = %s", (instance_id,))
    elif state.status.is_terminal:
        # The step that ends the execution drops the activities it was waiting for, queued
        # or running (its own are written below, and run).
        tx.run(
            "DELETE FROM activities WHERE instance_id = %s AND EXISTS (SELECT 1 FROM instances "
            "WHERE instance_id = %s AND NOT status = ANY(finished_statuses()))",
            (instance_id, instance_id),
        )
    if result.history:
        start = 0 if result.reset_history else _history_start(tx, instance_id)
        tx.run(
            "INSERT INTO history (instance_id, seq, event) SELECT %s, coalesce(%s::integer, "
            "(SELECT coalesce(max(seq) + 1, 0) FROM history WHERE instance_id = %s)) "
            "+ h.ord - 1, h.event FROM unnest(%s::bytea[]) WITH ORDINALITY AS h(event, ord)",
            (instance_id, start, instance_id, [e.SerializeToString() for e in result.history]),
        )
    if result.consumed:
        tx.run(
            "DELETE FROM inbox WHERE instance_id = %s AND id = ANY(%s::bigint[])",
            (instance_id, list(result.consumed)),
        )
    handed = _insert_activities(tx, result, take)
    _start_instances(tx, result.new_instances)
    arrived: list[tuple[bytes, datetime]] = []
    if result.reset_history:
        # The new execution's start and carried-over events go before the events that
        # arrived during the step, which the old execution never saw.
        arrived = tx.run(
            "WITH gone AS (DELETE FROM inbox WHERE instance_id = %s "
            "RETURNING id, event, visible_at) "
            "SELECT event, visible_at FROM gone ORDER BY id",
            (instance_id,),
        ).fetchall()
    send(tx, result.messages)
    if arrived:
        tx.run(
            "INSERT INTO inbox (instance_id, event, visible_at) SELECT %s, a.event, a.visible_at "
            "FROM unnest(%s::bytea[], %s::timestamptz[]) "
            "WITH ORDINALITY AS a(event, visible_at, ord) "
            "ORDER BY a.ord",
            (instance_id, [a[0] for a in arrived], [a[1] for a in arrived]),
        )
    row = tx.run(
        f"UPDATE instances SET ({INSTANCE_COLUMNS}) = ({', '.join(['%s'] * INSTANCE_FIELDS)}), "
        "lease_owner = NULL, lease_until = NULL, attempts = 0, "
        "ready_at = (SELECT min(visible_at) FROM inbox WHERE instance_id = %s) "
        "WHERE instance_id = %s RETURNING ready_at IS NOT NULL",
        (*state_values(state), instance_id, instance_id),
    ).fetchone()
    tx.released.append((WorkKind.ORCHESTRATION, instance_id))
    return handed, bool(row and row[0])


# write_step's arguments (schema.sql): the Holds guard, the step, its take, its messages.
_WRITE_STEP = (
    "SELECT * FROM write_step(%s::text, %s::bigint, %s::text, %s::integer, %s::bytea[], "
    "%s::bigint[], %s::text, %s::text, %s::text, %s::smallint, %s::text, %s::text, %s::text, "
    "%s::bytea, %s::timestamptz, %s::timestamptz, %s::timestamptz, %s::timestamptz, %s::text, "
    "%s::jsonb, %s::bytea, %s::timestamptz, %s::integer, %s::text, %s::interval, %s::bytea[], "
    "%s::text[], %s::bytea[], %s::timestamptz[], %s::text[], %s::bytea[], %s::timestamptz[], "
    "%s::text[], %s::bytea[], %s::timestamptz[])"
)


def _write_one_step(
    tx: Tx, result: StepResult, take: TakeActivities | None
) -> tuple[list[ActivityWorkItem], bool]:
    """`_write_step` in one call of the schema's write_step, for a step that does not
    continue as new and starts no instance (the commit's guards held)."""
    query, params, written = _step_call(tx, result, take, None)
    row = tx.run(query, params).fetchone()
    assert row is not None
    handed = written(row)
    assert handed is not None  # (no guard)
    return handed


def _step_call(
    tx: Tx, result: StepResult, take: TakeActivities | None, guard: Lease | None
) -> tuple[
    str, Sequence[Any], Callable[[Sequence[Any]], tuple[list[ActivityWorkItem], bool] | None]
]:
    """The call of write_step for a step (see `_write_one_step`), with `guard`: after checking
    that the instance is leased with it. Returns the statement, its parameters, and what makes
    its row the activities the step leased and whether the instance has messages after it
    (None if the lease was not held: nothing was written)."""
    state = result.state
    instance_id = state.instance_id
    now = utc(tx.now)
    start = _history_start(tx, instance_id)
    activities = result.activities
    count = min(take.count, len(activities)) if take is not None else 0
    owner = take.owner if take is not None else None
    assert all(a.instance_id == instance_id for a in activities)
    others = [
        m
        for m in result.messages
        if m.target_instance_id != instance_id and not is_entity_id(m.target_instance_id)
    ]
    own = [m for m in result.messages if m.target_instance_id == instance_id]
    to_entities = [m for m in result.messages if is_entity_id(m.target_instance_id)]
    params = (
        guard.owner if guard is not None else None,
        guard.epoch if guard is not None else None,
        instance_id,
        start,
        ByteaArray(e.SerializeToString() for e in result.history),
        BigintArray(result.consumed),
        *state_values(state)[1:],
        now,
        count,
        owner,
        tx.ttl,
        ByteaArray(a.scheduled.SerializeToString() for a in activities),
        TextArray(m.target_instance_id for m in others),
        ByteaArray(m.event.SerializeToString() for m in others),
        TimestamptzArray(utc(m.visible_at) if m.visible_at else now for m in others),
        TextArray(m.execution_id for m in others),
        ByteaArray(m.event.SerializeToString() for m in own),
        TimestamptzArray(utc(m.visible_at) if m.visible_at else now for m in own),
        TextArray(m.target_instance_id for m in to_entities),
        ByteaArray(m.event.SerializeToString() for m in to_entities),
        TimestamptzArray(utc(m.visible_at) if m.visible_at else now for m in to_entities),
    )

    def written(row: Sequence[Any]) -> tuple[list[ActivityWorkItem], bool] | None:
        held, waiting, delivered, leased, epochs = row
        if not held:
            return None
        tx.steps += 1
        tx.dropped += len(others) - delivered
        tx.released.append((WorkKind.ORCHESTRATION, instance_id))
        return _handed(tx, activities[:count], leased, epochs, owner or ""), bool(waiting)

    return _WRITE_STEP, params, written


def _insert_activities(
    tx: Tx, result: StepResult, take: TakeActivities | None
) -> list[ActivityWorkItem]:
    """Insert the step's activities, the first `take.count` leased to `take.owner`; returns
    the work items of those, in the step's order."""
    activities = result.activities
    if not activities:
        return []
    count = min(take.count, len(activities)) if take is not None else 0
    owner = take.owner if take is not None else None
    rows = tx.run(
        """
        INSERT INTO activities
            (instance_id, execution_id, event, visible_at, lease_owner, lease_epoch, lease_until)
        SELECT a.instance_id, a.execution_id, a.event, %(now)s,
            CASE WHEN a.ord <= %(count)s THEN %(owner)s::text END,
            CASE WHEN a.ord <= %(count)s THEN nextval('lease_epochs') ELSE 0 END,
            CASE WHEN a.ord <= %(count)s THEN now() + %(ttl)s END
        FROM unnest(%(ids)s::text[], %(executions)s::text[], %(events)s::bytea[])
            WITH ORDINALITY AS a(instance_id, execution_id, event, ord)
        ORDER BY a.ord
        RETURNING id, lease_owner IS NOT NULL, lease_epoch
        """,
        {
            "now": utc(tx.now),
            "count": count,
            "owner": owner,
            "ttl": tx.ttl,
            "ids": [a.instance_id for a in activities],
            "executions": [a.execution_id for a in activities],
            "events": [a.scheduled.SerializeToString() for a in activities],
        },
    ).fetchall()
    if not count:
        return []
    # Identity values are drawn in insertion order: the step's order.
    leased = sorted((r[0], r[2]) for r in rows if r[1])
    assert owner is not None and len(leased) == count
    return _handed(tx, activities[:count], [i for i, _ in leased], [e for _, e in leased], owner)


def _handed(
    tx: Tx,
    activities: Sequence[ActivityTask],
    ids: Sequence[int],
    epochs: Sequence[int],
    owner: str,
) -> list[ActivityWorkItem]:
    """The work items of activities a step leased as it wrote them (a hand-over)."""
    items = []
    for activity_id, epoch, activity in zip(ids, epochs, activities, strict=True):
        lease = Lease(owner, epoch)
        items.append(
            ActivityWorkItem(
                id=activity_id,
                instance_id=activity.instance_id,
                execution_id=activity.execution_id,
                scheduled=activity.scheduled,
                lease=lease,
            )
        )
        tx.taken.append((WorkKind.ACTIVITY, activity_id, lease, 0))
    return items


def _drop_pending(tx: Tx, instance_id: str) -> None:
    tx.run("DELETE FROM inbox WHERE instance_id = %s", (instance_id,))
    tx.run("DELETE FROM activities WHERE instance_id = %s", (instance_id,))
    tx.run("UPDATE instances SET ready_at = NULL WHERE instance_id = %s", (instance_id,))


def _write_entity_step(tx: Tx, result: EntityStepResult) -> None:
    entity = result.entity
    entity_id = entity.instance_id
    if result.consumed:
        tx.run(
            "DELETE FROM entity_inbox WHERE instance_id = %s AND id = ANY(%s::bigint[])",
            (entity_id, list(result.consumed)),
        )
    if result.deferred:
        tx.run(
            "UPDATE entity_inbox SET deferred = true WHERE instance_id = %s "
            "AND id = ANY(%s::bigint[])",
            (entity_id, list(result.deferred)),
        )
    send(tx, result.messages)
    _start_instances(tx, result.new_instances)
    tx.run(
        "UPDATE entities SET state = %s, last_modified_at = %s, locked_by = %s, lock_owner = %s, "
        "lease_owner = NULL, lease_until = NULL, attempts = 0, ready_at = (SELECT "
        "min(visible_at) FROM entity_inbox WHERE instance_id = %s AND NOT deferred) "
        "WHERE instance_id = %s",
        (
            entity.state,
            utc(entity.last_modified_at),
            entity.locked_by,
            entity.lock_owner,
            entity_id,
            entity_id,
        ),
    )
    tx.run(
        "DELETE FROM entities e WHERE instance_id = %s AND state IS NULL AND locked_by IS NULL "
        "AND NOT EXISTS (SELECT 1 FROM entity_inbox m WHERE m.instance_id = e.instance_id)",
        (entity_id,),
    )
    tx.released.append((WorkKind.ENTITY, entity_id))


_ATTEMPTS = {
    Attempts.KEEP: "attempts",
    Attempts.COUNT: "attempts + 1",
    Attempts.RESET: "0",
}


def _release(tx: Tx, release: Release) -> None:
    """Give a lease back, if it is still this one; see `Release`."""
    table, key = LEASED_TABLE[release.kind]
    attempts = _ATTEMPTS[release.attempts]
    lease = release.lease
    tx.released.append((release.kind, release.key))
    if release.kind is WorkKind.ACTIVITY:
        tx.run(
            f"UPDATE activities SET lease_owner = NULL, lease_until = NULL, "
            f"attempts = {attempts}, visible_at = %s "
            "WHERE id = %s AND lease_owner = %s AND lease_epoch = %s",
            (utc(release.until or tx.now), release.key, lease.owner, lease.epoch),
        )
        return
    released = tx.run(
        f"UPDATE {table} SET lease_owner = NULL, lease_until = NULL, attempts = {attempts} "
        f"WHERE {key} = %s AND lease_owner = %s AND lease_epoch = %s RETURNING 1",
        (release.key, lease.owner, lease.epoch),
    ).fetchone()
    if released is None or not release.message_ids or release.until is None:
        return  # not ours to release; or its queue is as it was, and so is its readiness
    inbox = "inbox" if release.kind is WorkKind.ORCHESTRATION else "entity_inbox"
    ready = "" if release.kind is WorkKind.ORCHESTRATION else " AND NOT deferred"
    tx.run(
        f"UPDATE {inbox} SET visible_at = %s WHERE instance_id = %s AND id = ANY(%s::bigint[])",
        (utc(release.until), release.key, list(release.message_ids)),
    )
    tx.run(
        f"UPDATE {table} SET ready_at = (SELECT min(visible_at) FROM {inbox} "
        f"WHERE instance_id = %s{ready}) WHERE {key} = %s",
        (release.key, release.key),
    )


# -- takes ------------------------------------------------------------------------------------


def _take_instance(tx: Tx, owner: str, instance_id: str) -> OrchestrationWorkItem | None:
    row = tx.run(
        "UPDATE instances i SET lease_owner = %(owner)s, lease_epoch = nextval('lease_epochs'), "
        "lease_until = now() + %(ttl)s WHERE i.instance_id = %(id)s AND i.lease_owner IS NULL "
        f"AND i.ready_at <= %(now)s RETURNING {LEASED_INSTANCE}",
        {"owner": owner, "ttl": tx.ttl, "id": instance_id, "now": utc(tx.now)},
    ).fetchone()
    if row is None:
        return None
    return load_orchestrations(tx, [row], owner)[0]
