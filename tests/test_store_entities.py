"""Entities in the store: queues, leases, deferred messages, cleaning (sqlite file and memory,
or PostgreSQL)."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from _harness import STORE_KINDS, store_factory

from dt_trio import _core as core
from dt_trio._core import EntityStepResult, InstanceState, OutboundMessage, Status, StepResult
from dt_trio._core import _events as ev
from dt_trio._core import _operations as ops
from dt_trio._core._commit import EntityWorkItem, Lease
from dt_trio._errors import LockLost
from dt_trio._store import Backend, EntityFilter

COUNTER = "@counter@k"


def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Any]:
    backend = store_factory(request.param, tmp_path)()
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


async def signal(store: Backend, op: str = "add", at: datetime | None = None) -> None:
    t = now()
    event = core.signal_event(t, COUNTER, op, "1", op)
    await store.apply(ops.signal_entity(COUNTER, event, at or t, t))


async def commit(store: Backend, item: EntityWorkItem, result: EntityStepResult) -> None:
    await store.apply(ops.entity_step(item, result, now()))


async def lease(store: Backend, owner: str = "me") -> EntityWorkItem | None:
    items = await store.lease_entities(owner, now(), 10)
    assert len(items) <= 1
    return items[0] if items else None


def ran(item: EntityWorkItem, state: str | None, **lock: str | None) -> EntityStepResult:
    """The step of a worker that ran every operation of `item`'s queue."""
    entity = dataclasses.replace(item.entity, state=state, last_modified_at=now(), **lock)
    return EntityStepResult(entity, tuple(m.id for m in item.inbox), ())


async def test_a_signal_creates_the_entity_and_a_commit_stores_its_state(
    store: Backend,
) -> None:
    await signal(store)
    transient = await store.get_entity(COUNTER)
    assert transient is not None and transient.state is None and transient.backlog == 1
    item = await lease(store)
    assert item is not None and [m.event.entityOperationSignaled.operation for m in item.inbox] == [
        "add"
    ]
    assert await lease(store, "other") is None  # leased once
    await commit(store, item, ran(item, "1"))
    stored = await store.get_entity(COUNTER)
    assert stored is not None and (stored.state, stored.backlog) == ("1", 0)
    assert await lease(store) is None


async def test_an_entity_left_without_state_lock_or_queue_is_deleted(store: Backend) -> None:
    await signal(store, "delete")
    item = await lease(store)
    assert item is not None
    await commit(store, item, ran(item, None))
    assert await store.get_entity(COUNTER) is None


async def test_a_commit_without_the_lease_is_refused(store: Backend) -> None:
    await signal(store)
    item = await lease(store)
    assert item is not None
    intruder = dataclasses.replace(item, lease=Lease("someone-else", item.lease.epoch))
    with pytest.raises(LockLost):
        await commit(store, intruder, ran(item, "1"))


async def test_deferred_messages_do_not_lease_the_entity_again(store: Backend) -> None:
    await signal(store)
    item = await lease(store)
    assert item is not None
    locked = dataclasses.replace(item.entity, locked_by="cs1", lock_owner="orch1")
    await commit(store, item, EntityStepResult(locked, (), (item.inbox[0].id,)))
    assert await lease(store) is None  # nothing new: the signal waits for the lock
    await signal(store, "second")  # a new message is a reason to look again
    again = await lease(store)
    assert again is not None and len(again.inbox) == 2


async def test_a_delayed_signal_is_leased_at_its_time(store: Backend) -> None:
    at = now() + timedelta(hours=1)
    await signal(store, at=at)
    nothing = await store.lease_entities("me", now(), 10)
    assert nothing == [] and nothing.next_at == at


async def test_messages_reach_orchestrations_only_in_the_execution_they_name(
    store: Backend,
) -> None:
    t = now()
    state = InstanceState("orch1", "o", "x2", Status.RUNNING, t, t)
    first = core.signal_event(t, COUNTER, "unused", None, "r")  # any event will do
    await store.apply(ops.start(state, first, t, t))
    await signal(store)
    item = await lease(store)
    assert item is not None
    stale, current = (core.signal_event(t, COUNTER, op, None, op) for op in ("stale", "current"))
    step = dataclasses.replace(
        ran(item, "1"),
        messages=[
            OutboundMessage("orch1", stale, execution_id="x1"),
            OutboundMessage("orch1", current, execution_id="x2"),
        ],
    )
    await commit(store, item, step)
    [work] = await store.lease_orchestrations("me", now(), 10)
    operations = [m.event.entityOperationSignaled.operation for m in work.inbox]
    assert operations == ["unused", "current"]


async def test_cleaning_releases_orphaned_locks_and_removes_empty_entities(
    store: Backend,
) -> None:
    await signal(store)
    item = await lease(store)
    assert item is not None
    # The lock of an orchestration that does not exist (purged, say), with a signal waiting.
    locked = dataclasses.replace(item.entity, locked_by="cs1", lock_owner="ghost")
    await commit(store, item, EntityStepResult(locked, (), (item.inbox[0].id,)))
    assert await store.clean_entity_storage(True, False) == (0, 0)  # locked: not empty
    assert await store.clean_entity_storage(False, True) == (0, 1)
    freed = await lease(store)
    assert freed is not None and freed.entity.locked_by is None  # the signal may run now
    await commit(store, freed, EntityStepResult(freed.entity, (), ()))
    # Still queued, so still there; once the queue is gone an empty row would be removed.
    assert (await store.get_entity(COUNTER)) is not None


async def test_query_entities_pages_by_id(store: Backend) -> None:
    t = now()
    for n in range(5):
        entity_id = f"@counter@q{n}"
        event = core.signal_event(t, entity_id, "set", None, "r")
        await store.apply(ops.signal_entity(entity_id, event, t, t))
    for item in await store.lease_entities("me", now(), 10):
        state = None if item.entity.instance_id == "@counter@q4" else "1"
        await commit(
            store,
            item,
            EntityStepResult(
                dataclasses.replace(item.entity, state=state), tuple(m.id for m in item.inbox), ()
            ),
        )
    page, after = await store.query_entities(EntityFilter(id_prefix="@counter@q"), 3, None)
    assert [e.instance_id for e in page] == ["@counter@q0", "@counter@q1", "@counter@q2"]
    rest, end = await store.query_entities(EntityFilter(id_prefix="@counter@q"), 3, after)
    assert [e.instance_id for e in rest] == ["@counter@q3"] and end is None


async def test_cleaning_releases_a_lock_the_owners_current_execution_does_not_hold(
    store: Backend,
) -> None:
    t = now()
    owner = InstanceState("orch1", "o", "x2", Status.RUNNING, t, t)
    started = ev.execution_started(t, name="o", instance_id="orch1", execution_id="x2", input=None)
    await store.apply(ops.start(owner, started, t, t))
    [step] = await store.lease_orchestrations("me", now(), 1)
    held = ev.new_event(t, 0)
    held.entityLockRequested.criticalSectionId = "cs-now"
    held.entityLockRequested.lockSet.append("@counter@held")
    result = StepResult(
        state=step.state, consumed=(step.inbox[0].id,), history=[step.inbox[0].event, held]
    )
    await store.apply(ops.step(step.lease, result, now()))
    for entity_id, section in (("@counter@held", "cs-now"), ("@counter@stale", "cs-old")):
        event = core.signal_event(t, entity_id, "x", None, "r")
        await store.apply(ops.signal_entity(entity_id, event, t, t))
        [item] = await store.lease_entities("me", now(), 10)
        locked = dataclasses.replace(item.entity, locked_by=section, lock_owner="orch1")
        await commit(store, item, EntityStepResult(locked, (), (item.inbox[0].id,)))
    # cs-old was requested by an earlier execution (before a continue-as-new): orphaned
    assert await store.clean_entity_storage(False, True) == (0, 1)
    stale, kept = await store.get_entity("@counter@stale"), await store.get_entity("@counter@held")
    assert stale is not None and stale.locked_by is None
    assert kept is not None and kept.locked_by == "cs-now"
