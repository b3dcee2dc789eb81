"""How the sqlite store applies a `Commit` (see dt_trio._core._commit) in a write transaction:
guards first, then the writes in order, then the leases it takes."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from dt_trio._core import (
    InboxMessage,
    NewInstance,
    OutboundMessage,
    StepResult,
    evolve,
    is_entity_id,
)
from dt_trio._core._commit import (
    ActivityWorkItem,
    Applied,
    AsFound,
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
    TakeActivities,
    TakeInstance,
    Unchanged,
    WorkKind,
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
from dt_trio._store._rows import us
from dt_trio._store._sqlite import _entities, _instances, _work
from dt_trio._store._sqlite._rows import release_lease

log = get_logger(__name__)
_UNLEASED = Lease("", 0)


def apply(commit: Commit, next_epoch: Callable[[], int], conn: sqlite3.Connection) -> Applied:
    """Apply `commit` (all of it, or its `otherwise`, or nothing and raise). The leases it
    takes get one new epoch from `next_epoch`. A function of the store alone: safe to run
    again after its transaction was rolled back."""
    # An activity's lease is checked by the statement that deletes it (one statement, not
    # two, on the hot path of every activity result): if it fails, it raises LockLost before
    # anything else is written, as the guard would have. With an `otherwise`, the guard's
    # failure would apply that instead, whose own activity guard fails the same way.
    fenced: dict[int, Lease] = {}
    # Whether instances exist, as the guards found them (the writes need not ask again).
    existing: dict[str, bool] = {}
    for guard in commit.guards:
        if type(guard) is Holds and guard.kind is WorkKind.ACTIVITY and type(guard.key) is int:
            if _deletes(commit, guard.key):
                fenced[guard.key] = guard.lease
                continue
        failure = _check(conn, guard, existing)
        if failure is not None:
            if commit.otherwise is None:
                raise failure
            return evolve(apply(commit.otherwise, next_epoch, conn), alternative=True)
    now_us = us(commit.now)
    epoch = next_epoch() if commit.take else 0
    activities: TakeActivities | None = None
    for take in commit.take:
        if type(take) is TakeActivities:
            activities = take
    handed: list[ActivityWorkItem] = []
    waiting = False
    dropped = 0
    created: dict[str, OrchestrationWorkItem] = {}  # instances created, as a take would find them
    for write in commit.writes:
        # (`type() is`: these are final classes, and this runs for every write)
        if type(write) is WriteStep:
            lease = Lease(activities.owner, epoch) if activities is not None else None
            count = activities.count if activities is not None else 0
            handed, waiting, lost = _write_step(conn, write.result, now_us, lease, count)
            dropped += lost
        elif type(write) is Send:
            dropped += send(conn, write.messages, now_us)
        elif type(write) is CreateInstance:
            instance_id = write.state.instance_id
            exists = existing.get(instance_id)
            if exists is None:
                exists = _instances.status_and_update(conn, instance_id) is not None
            if exists:
                _instances.delete(conn, [instance_id])  # its guard allowed it
            visible_us = us(write.visible_at)
            message_id = _instances.insert(conn, write.state, write.started, visible_us)
            if write.started is not None and visible_us <= now_us and len(commit.writes) == 1:
                # All of it is known, should the commit take the instance: nothing to read.
                inbox = [InboxMessage(message_id, write.started)]
                created[instance_id] = OrchestrationWorkItem(write.state, [], inbox, _UNLEASED)
        elif type(write) is DeleteActivity:
            held = fenced.get(write.activity_id)
            if not _work.delete(conn, write.activity_id, held) and held is not None:
                raise _activity_lost(write.activity_id, held)
        elif type(write) is Release:
            _release(conn, write, now_us)
        elif type(write) is WriteEntityStep:
            result = write.result
            _entities.write_step(conn, result)
            dropped += send(conn, result.messages, now_us)
            _start_instances(conn, result.new_instances, now_us)
        elif type(write) is DropPending:
            _instances.drop_pending(conn, write.instance_id)
        else:
            assert isinstance(write, Reopen)
            _instances.reopen(conn, write.instance_id, now_us)
    taken: list[OrchestrationWorkItem] = []
    for take in commit.take:
        if type(take) is TakeInstance:
            lease = Lease(take.owner, epoch)
            new = created.get(take.instance_id)
            if new is not None:
                _instances.take_created(conn, take.instance_id, lease)
                taken.append(evolve(new, lease=lease))
                continue
            item = _instances.take(conn, take.instance_id, lease, now_us)
            if item is not None:
                taken.append(item)
    return Applied(False, tuple(taken), tuple(handed), waiting, dropped)


def _deletes(commit: Commit, activity_id: int) -> bool:
    for write in commit.writes:
        if type(write) is DeleteActivity and write.activity_id == activity_id:
            return True
    return False


def _check(conn: sqlite3.Connection, guard: Guard, existing: dict[str, bool]) -> DtTrioError | None:
    """The error `guard` fails with, or None if it holds (noting in `existing` whether the
    instance it looked at exists)."""
    if isinstance(guard, Holds):
        return _check_lease(conn, guard)
    if isinstance(guard, AsFound):
        found = _instances.as_found(
            conn, guard.instance_id, guard.execution_id, us(guard.last_updated_at)
        )
        return None if found else LockLost(f"instance '{guard.instance_id}' has moved on")
    found_row = _instances.status_and_update(conn, guard.instance_id)
    existing[guard.instance_id] = found_row is not None
    if isinstance(guard, Creatable):
        if found_row is None or found_row[0] in guard.replaceable:
            return None
        return InstanceExists(guard.instance_id, found_row[0].label)
    if found_row is None:
        return InstanceNotFound(guard.instance_id)
    status, last_update = found_row
    if isinstance(guard, Exists):
        return None
    if isinstance(guard, InStatus):
        if status == guard.status:
            return None
        return FailedPrecondition(f"instance '{guard.instance_id}' is {status.label}; {guard.why}")
    assert isinstance(guard, Unchanged)
    if status.is_terminal:
        return FailedPrecondition(f"instance '{guard.instance_id}' is {status.label}")
    if last_update != us(guard.last_updated_at):
        return FailedPrecondition(f"instance '{guard.instance_id}' changed since it was read")
    return None


def _check_lease(conn: sqlite3.Connection, guard: Holds) -> LockLost | None:
    if guard.kind is WorkKind.ORCHESTRATION:
        assert isinstance(guard.key, str)
        held, what = _instances.holder(conn, guard.key), f"instance '{guard.key}'"
    elif guard.kind is WorkKind.ACTIVITY:
        assert isinstance(guard.key, int)
        held = _work.holder(conn, guard.key)
        return None if held == guard.lease else _activity_lost(guard.key, guard.lease)
    else:
        assert isinstance(guard.key, str)
        held, what = _entities.holder(conn, guard.key), f"entity '{guard.key}'"
    if held == guard.lease:
        return None
    return LockLost(f"{what} is no longer leased by {guard.lease.owner}")


def _activity_lost(activity_id: int, lease: Lease) -> LockLost:
    return LockLost(
        f"activity work item {activity_id} is no longer leased by {lease.owner} (its "
        "orchestration ended or was purged meanwhile)"
    )


def send(conn: sqlite3.Connection, messages: Sequence[OutboundMessage], now_us: int) -> int:
    """Deliver `messages` (visible at `now_us` unless they say otherwise); how many were
    dropped because their instance, or the execution they name, is gone."""
    dropped = 0
    for message in messages:
        visible = us(message.visible_at) if message.visible_at else now_us
        blob = message.event.SerializeToString()
        target = message.target_instance_id
        if is_entity_id(target):
            _entities.enqueue(conn, target, blob, visible)
        elif not _instances.enqueue(conn, target, blob, visible, message.execution_id):
            dropped += 1
    return dropped


def _write_step(
    conn: sqlite3.Connection,
    result: StepResult,
    now_us: int,
    lease: Lease | None,
    count: int,
) -> tuple[list[ActivityWorkItem], bool, int]:
    """Write one orchestration step (see `WriteStep`). Returns the activities leased as they
    were written (the first `count`, with `lease`), whether the instance has messages waiting
    after it, and how many of its messages were dropped."""
    instance_id = result.state.instance_id
    _instances.write_step(conn, result)
    handed = _work.add(conn, result.activities, now_us, lease, count)
    if result.new_instances:
        _start_instances(conn, result.new_instances, now_us)
    # The new execution's start and carried-over events go before the events that arrived
    # during the step, which the old execution never saw.
    arrived = _instances.take_inbox(conn, instance_id) if result.reset_history else []
    dropped = send(conn, result.messages, now_us)
    if arrived:
        _instances.put_back(conn, instance_id, arrived)
    return handed, _instances.has_inbox(conn, instance_id), dropped


def _start_instances(
    conn: sqlite3.Connection, new_instances: Sequence[NewInstance], now_us: int
) -> None:
    """Create the instances an orchestration or entity started (or send their conflict)."""
    for new in new_instances:
        instance_id = new.state.instance_id
        found = _instances.status_and_update(conn, instance_id)
        if found is not None and (not new.replace_finished or not found[0].is_terminal):
            if new.on_conflict is not None:
                send(conn, [new.on_conflict], now_us)
            else:
                log.info("%s exists; the start asked for by an entity is dropped", instance_id)
            continue
        if found is not None:
            _instances.delete(conn, [instance_id])
        visible = new.state.scheduled_start_at or new.state.created_at
        _instances.insert(conn, new.state, new.started, us(visible))


def _release(conn: sqlite3.Connection, release: Release, now_us: int) -> None:
    until = us(release.until) if release.until is not None else None
    if release.kind is WorkKind.ACTIVITY:
        assert isinstance(release.key, int)
        visible = until if until is not None else now_us
        _work.release(conn, release.key, release.lease, release.attempts, visible)
        return
    assert isinstance(release.key, str)
    table, inbox = (
        ("instances", "inbox")
        if release.kind is WorkKind.ORCHESTRATION
        else ("entities", "entity_inbox")
    )
    release_lease(
        conn, table, inbox, release.key, release.lease, release.attempts, release.message_ids, until
    )
