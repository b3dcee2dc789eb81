"""The store through its async interface: on an sqlite file and in memory (or, on a
PostgreSQL run, on PostgreSQL), and the sqlite store's own machinery (marked sqlite_only)."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import sqlite3
import threading
from datetime import timedelta
from typing import Any

import pytest
import trio
from _harness import STORE_KINDS, cache_problems, store_factory
from _values import new_state, now, started

from dt_trio._core import (
    ActivityTask,
    InstanceState,
    NewInstance,
    OutboundMessage,
    Status,
    StepResult,
)
from dt_trio._core import _events as ev
from dt_trio._core import _operations as ops
from dt_trio._core._commit import (
    ActivityWorkItem,
    Applied,
    Attempts,
    Lease,
    OrchestrationWorkItem,
)
from dt_trio._errors import InstanceExists, InstanceNotFound, LockLost, StoreUnavailable
from dt_trio._proto import orchestrator_service_pb2 as pb
from dt_trio._store import Backend, InstanceFilter, SqliteBackend
from dt_trio._store._sqlite._schema import APPLICATION_ID


async def lease_one(store: Backend, owner: str) -> OrchestrationWorkItem | None:
    items = await store.lease_orchestrations(owner, now(), 1)
    return items[0] if items else None


async def lease_one_activity(store: Backend, owner: str) -> ActivityWorkItem | None:
    items = await store.lease_activities(owner, now(), 1)
    return items[0] if items else None


async def create(store: Backend, state: InstanceState) -> None:
    t = now()
    await store.apply(ops.start(state, started(state), t, t))


async def commit_step(
    store: Backend, item: OrchestrationWorkItem, result: StepResult, take: int = 0
) -> Applied:
    return await store.apply(ops.step(item.lease, result, now(), take))


async def test_created_instance_reads_back_with_every_field(store: Backend) -> None:
    trace = pb.OrchestrationTraceContext()
    trace.spanID.value = "abc"
    state = new_state(
        version="v2", scheduled_start_at=now() + timedelta(hours=1), trace_context=trace
    )
    await create(store, state)
    loaded = await store.get_instance("i1")
    assert loaded == state
    assert await store.get_instance("missing") is None


async def test_creating_over_a_running_instance_is_refused_and_changes_nothing(
    store: Backend,
) -> None:
    await create(store, new_state())
    with pytest.raises(InstanceExists, match="'i1' already exists and is pending"):
        await create(store, new_state(input='"other"'))
    loaded = await store.get_instance("i1")
    assert loaded is not None and loaded.input == '"x"'


async def test_a_finished_instance_may_be_replaced(store: Backend) -> None:
    await create(store, new_state())
    item = await lease_one(store, "me")
    assert item is not None
    done = dataclasses.replace(item.state, status=Status.COMPLETED, completed_at=now())
    await commit_step(store, item, StepResult(state=done, consumed=(item.inbox[0].id,), history=[]))
    await create(store, new_state(input='"again"'))
    loaded = await store.get_instance("i1")
    assert loaded is not None and loaded.status == Status.PENDING and loaded.input == '"again"'


async def finish(
    store: Backend, instance_id: str = "i1", status: Status = Status.COMPLETED
) -> InstanceState:
    item = await lease_one(store, "me")
    assert item is not None and item.state.instance_id == instance_id
    done = dataclasses.replace(
        item.state, status=status, completed_at=now(), last_updated_at=now(), output='"y"'
    )
    await commit_step(store, item, StepResult(state=done, consumed=(item.inbox[0].id,), history=[]))
    return done


@pytest.mark.sqlite_only
@pytest.mark.contract
async def test_running_and_finished_instances_read_back_without_a_store_read(
    store: SqliteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients ask for instances while they run and as they finish (GetInstance, the waits):
    the writer keeps the rows it last committed, and those reads need no read.

    Contract: reads of instances the writer last committed cost no read of the database."""
    state = new_state()
    await create(store, state)

    async def no_read(fn: Any) -> Any:
        raise AssertionError("the store was read")

    with monkeypatch.context() as patched:
        patched.setattr(store._db, "read", no_read)
        assert await store.get_instance("i1") == state
    done = await finish(store)
    with monkeypatch.context() as patched:
        patched.setattr(store._db, "read", no_read)
        assert await store.get_instance("i1") == done
    assert await cache_problems(store) == []


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_a_closed_store_answers_no_read_from_its_cache(
    tmp_path: pathlib.Path, kind: str
) -> None:
    store = store_factory(kind, tmp_path)()
    await store.open()
    await create(store, new_state())
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.get_instance("i1")
    with pytest.raises(StoreUnavailable, match="not open"):
        await create(store, new_state("i2"))


async def test_every_change_of_a_finished_instance_reaches_its_kept_row(
    store: Backend,
) -> None:
    await create(store, new_state())
    await finish(store)
    await create(store, new_state(input='"again"'))  # replaced
    loaded = await store.get_instance("i1")
    assert loaded is not None and loaded.status == Status.PENDING and loaded.input == '"again"'
    await finish(store, status=Status.FAILED)
    rewound = ev.new_event(now())
    rewound.executionRewound.SetInParent()
    await store.apply(ops.rewind("i1", rewound, now()))
    loaded = await store.get_instance("i1")
    assert loaded is not None and loaded.status == Status.RUNNING and loaded.output is None
    assert await cache_problems(store) == []
    await finish(store)
    assert await store.purge("i1", recursive=False) == 1
    assert await store.get_instance("i1") is None
    await create(store, new_state())
    await finish(store)
    await store.delete_everything()
    assert await store.get_instance("i1") is None
    assert await cache_problems(store) == []


async def test_lease_commit_appends_history_and_enqueues_the_outbox(store: Backend) -> None:
    await create(store, new_state())
    await create(store, new_state("target"))
    item = await lease_one(store, "me")
    assert item is not None and item.state.instance_id == "i1"
    assert [ev.kind(m.event) for m in item.inbox] == ["executionStarted"]
    # a leased instance is not leased twice
    other = await lease_one(store, "you")
    assert other is not None and other.state.instance_id == "target"

    scheduled = ev.new_event(now(), 1)
    scheduled.taskScheduled.name = "act"
    timer_at = now() + timedelta(minutes=5)
    child = new_state("child", parent_instance_id="i1")
    result = StepResult(
        state=dataclasses.replace(item.state, status=Status.RUNNING),
        consumed=(item.inbox[0].id,),
        history=[ev.orchestrator_started(now()), item.inbox[0].event, scheduled],
        activities=[ActivityTask("i1", "e0", scheduled)],
        messages=[
            OutboundMessage("i1", ev.timer_fired(now(), 2, timer_at), timer_at),
            OutboundMessage("target", ev.event_raised(now(), "ping", None)),
            OutboundMessage("nobody", ev.event_raised(now(), "lost", None)),
        ],
        new_instances=[
            NewInstance(
                child, started(child), OutboundMessage("i1", ev.event_raised(now(), "x", None))
            )
        ],
    )
    await commit_step(store, item, result)
    history = await store.get_history("i1")
    assert [ev.kind(e) for e in history] == [
        "orchestratorStarted",
        "executionStarted",
        "taskScheduled",
    ]
    assert (await store.get_instance("i1")).status == Status.RUNNING  # type: ignore[union-attr]
    assert (await store.get_instance("child")) is not None
    # the timer is not visible yet; a lease that takes less than it may says when to look again
    leased = await store.lease_orchestrations("me", now(), 10)
    assert [w.state.instance_id for w in leased] == ["child"]
    assert leased.next_at is not None and leased.next_at > now()
    activity = await lease_one_activity(store, "me")
    assert activity is not None and activity.scheduled.taskScheduled.name == "act"
    assert await lease_one_activity(store, "me") is None


async def test_commit_without_the_lease_is_refused(store: Backend) -> None:
    await create(store, new_state())
    item = await lease_one(store, "me")
    assert item is not None
    step = StepResult(state=item.state, consumed=(), history=[])
    with pytest.raises(LockLost, match="'i1' is no longer leased by intruder"):
        await store.apply(ops.step(Lease("intruder", item.lease.epoch), step, now()))


async def test_a_stale_grant_changes_nothing_even_for_the_same_owner(store: Backend) -> None:
    """A lease is (owner, epoch): the holder of an earlier grant of the same row, in the same
    process, can neither commit nor release what was leased again since."""
    await create(store, new_state())
    first = await lease_one(store, "me")
    assert first is not None
    await store.apply(ops.release(first, now(), Attempts.KEEP))
    second = await lease_one(store, "me")
    assert second is not None and second.lease.epoch > first.lease.epoch >= 1
    step = StepResult(state=first.state, consumed=(first.inbox[0].id,), history=[])
    with pytest.raises(LockLost):
        await store.apply(ops.step(first.lease, step, now()))
    with pytest.raises(LockLost):
        await store.read_inbox("i1", first.lease, now())
    await store.apply(ops.release(first, now(), Attempts.COUNT))  # not its to release
    assert await lease_one(store, "other") is None  # still leased, by the second grant
    assert len(await store.read_inbox("i1", second.lease, now())) == 1
    await store.apply(ops.step(second.lease, step, now()))


async def test_activity_results_reach_only_the_execution_that_scheduled_them(
    store: Backend,
) -> None:
    await create(store, new_state())
    item = await lease_one(store, "me")
    assert item is not None
    scheduled = ev.new_event(now(), 1)
    scheduled.taskScheduled.name = "act"
    await commit_step(
        store,
        item,
        StepResult(
            state=item.state,
            consumed=(item.inbox[0].id,),
            history=[item.inbox[0].event, scheduled],
            activities=[ActivityTask("i1", "e0", scheduled)],
        ),
    )
    activity = await lease_one_activity(store, "worker")
    assert activity is not None
    intruder = dataclasses.replace(activity, lease=Lease("someone-else", activity.lease.epoch))
    with pytest.raises(LockLost):
        await store.apply(ops.deliver_result(intruder, ev.task_completed(now(), 1, "1"), now()))
    await store.apply(ops.deliver_result(activity, ev.task_completed(now(), 1, "1"), now()))
    step = await lease_one(store, "me")
    assert step is not None
    assert [ev.kind(m.event) for m in step.inbox] == ["taskCompleted"]


async def test_the_step_that_ends_an_execution_drops_the_activities_it_waited_for(
    store: SqliteBackend,
) -> None:
    def activity(task_id: int) -> ActivityTask:
        scheduled = ev.new_event(now(), task_id)
        scheduled.taskScheduled.name = f"act{task_id}"
        return ActivityTask("i1", "e0", scheduled)

    await create(store, new_state())
    item = await lease_one(store, "me")
    assert item is not None
    running = dataclasses.replace(item.state, status=Status.RUNNING)
    first = [activity(1), activity(2)]
    await commit_step(store, item, StepResult(running, (item.inbox[0].id,), [], activities=first))
    in_flight = await lease_one_activity(store, "worker")  # act1 runs, act2 is queued
    assert in_flight is not None
    terminate = ev.execution_terminated(now(), None, False)
    await store.apply(ops.send_event("i1", terminate, now()))
    item = await lease_one(store, "me")
    assert item is not None
    ended = dataclasses.replace(running, status=Status.TERMINATED, completed_at=now())
    # the last step's own activity (fire and forget) still runs
    await commit_step(
        store, item, StepResult(ended, (item.inbox[0].id,), [], activities=[activity(3)])
    )
    # later events for the finished instance are dropped without touching it
    await store.apply(ops.send_event("i1", ev.event_raised(now(), "late", None), now()))
    item = await lease_one(store, "me")
    assert item is not None
    await commit_step(store, item, StepResult(ended, (item.inbox[0].id,), []))
    left = await store.lease_activities("worker", now(), 10)
    assert [a.scheduled.taskScheduled.name for a in left] == ["act3"]
    with pytest.raises(LockLost):  # act1's result has nowhere to go
        await store.apply(ops.deliver_result(in_flight, ev.task_completed(now(), 1, "1"), now()))


async def test_a_step_with_more_activities_than_one_statement_writes_them_all_in_order(
    store: Backend,
) -> None:
    """Steps write their rows many to a statement (500): a fan-out of 1,201 activities, some
    handed over in the commit, the rest queued, keeps every event, id and inbox message."""
    await create(store, new_state())
    for n in range(3):
        await store.apply(ops.send_event("i1", ev.event_raised(now(), f"e{n}", None), now()))
    item = await lease_one(store, "me")
    assert item is not None and len(item.inbox) == 4
    tasks = []
    for task_id in range(1, 1202):
        scheduled = ev.new_event(now(), task_id)
        scheduled.taskScheduled.name = f"act{task_id}"
        tasks.append(ActivityTask("i1", "e0", scheduled))
    applied = await commit_step(
        store,
        item,
        StepResult(
            state=dataclasses.replace(item.state, status=Status.RUNNING),
            consumed=tuple(m.id for m in item.inbox),
            history=[*(m.event for m in item.inbox), *(t.scheduled for t in tasks)],
            activities=tasks,
        ),
        take=1001,
    )
    handed = applied.activities
    history = await store.get_history("i1")
    assert [e.eventId for e in history[4:]] == list(range(1, 1202))
    assert await lease_one(store, "me") is None  # every inbox message consumed
    # The handed-over work items carry their rows' ids: each completes its own activity.
    assert [a.scheduled.taskScheduled.name for a in handed] == [f"act{i}" for i in range(1, 1002)]
    assert len({a.id for a in handed}) == 1001
    for activity in (handed[0], handed[499], handed[500], handed[-1]):
        done = ev.task_completed(now(), activity.scheduled.eventId, "1")
        await store.apply(ops.deliver_result(activity, done, now()))
    step = await lease_one(store, "me")
    assert step is not None
    assert [m.event.taskCompleted.taskScheduledId for m in step.inbox] == [1, 500, 501, 1001]
    queued = await store.lease_activities("worker", now(), 500)
    assert [a.scheduled.eventId for a in queued] == list(range(1002, 1202))


def scheduling_step(
    state: InstanceState, history: list[pb.HistoryEvent], task_id: int
) -> StepResult:
    """A step that records `history` and schedules activity `task_id`."""
    scheduled = ev.new_event(now(), task_id)
    scheduled.taskScheduled.name = "act"
    return StepResult(
        state=dataclasses.replace(state, status=Status.RUNNING, last_updated_at=now()),
        consumed=(),
        history=[*history, scheduled],
        activities=[ActivityTask(state.instance_id, state.execution_id, scheduled)],
    )


async def test_a_creation_commits_the_first_step_run_ahead_of_it(store: Backend) -> None:
    state = new_state()
    first = scheduling_step(state, [ev.orchestrator_started(now()), started(state)], 0)
    ahead = ops.Ahead(first, state.last_updated_at, "me", 1)
    applied = await store.apply(ops.start(state, started(state), now(), now(), ahead=ahead))
    assert [a.scheduled.eventId for a in applied.activities] == [0]
    assert not applied.waiting
    assert (await store.get_instance("i1")).status == Status.RUNNING  # type: ignore[union-attr]
    history = await store.get_history("i1")
    assert [ev.kind(e) for e in history] == [
        "orchestratorStarted",
        "executionStarted",
        "taskScheduled",
    ]
    # no ExecutionStarted message is left to lease, and the activity is ours already
    assert await lease_one(store, "me") is None
    assert await lease_one_activity(store, "me") is None


async def created_with_first_step(store: Backend) -> tuple[StepResult, ActivityWorkItem]:
    """Instance i1, created with its first step run ahead: it scheduled activity 0, leased
    to "me"."""
    state = new_state()
    first = scheduling_step(state, [ev.orchestrator_started(now()), started(state)], 0)
    ahead = ops.Ahead(first, state.last_updated_at, "me", 1)
    applied = await store.apply(ops.start(state, started(state), now(), now(), ahead=ahead))
    [activity] = applied.activities
    return first, activity


async def test_an_activity_result_commits_the_step_run_ahead_of_it_if_nothing_changed(
    store: Backend,
) -> None:
    first, activity = await created_with_first_step(store)
    done = ev.task_completed(now(), 0, '"a"')
    second = scheduling_step(first.state, [ev.orchestrator_started(now()), done], 1)
    ahead = ops.Ahead(second, first.state.last_updated_at, "me", 1)
    applied = await store.apply(ops.deliver_result(activity, done, now(), ahead=ahead))
    assert not applied.alternative
    assert [a.scheduled.eventId for a in applied.activities] == [1]
    assert [ev.kind(e) for e in await store.get_history("i1")][-3:] == [
        "orchestratorStarted",
        "taskCompleted",
        "taskScheduled",
    ]
    assert await lease_one(store, "me") is None  # the result went straight into history


@pytest.mark.parametrize("change", ["event", "lease", "step"])
async def test_an_activity_result_drops_a_step_run_ahead_of_a_change(
    store: Backend, change: str
) -> None:
    first, activity = await created_with_first_step(store)
    await store.apply(ops.send_event("i1", ev.event_raised(now(), "x", None), now()))
    if change == "lease":  # someone else steps the instance
        assert await lease_one(store, "other") is not None
    elif change == "step":  # a step was committed since
        item = await lease_one(store, "me")
        assert item is not None
        await commit_step(
            store,
            item,
            StepResult(
                state=dataclasses.replace(item.state, last_updated_at=now()),
                consumed=(item.inbox[0].id,),
                history=[item.inbox[0].event],
            ),
        )
    # else: something arrived, which the step did not see
    done = ev.task_completed(now(), 0, '"a"')
    second = scheduling_step(first.state, [ev.orchestrator_started(now()), done], 1)
    ahead = ops.Ahead(second, first.state.last_updated_at, "me", 1)
    applied = await store.apply(ops.deliver_result(activity, done, now(), take="me", ahead=ahead))
    # delivered the ordinary way, and leased to us with it unless someone else has it
    assert applied.alternative
    assert "taskScheduled" not in [ev.kind(e) for e in (await store.get_history("i1"))[3:]]
    assert await lease_one_activity(store, "me") is None
    if change == "lease":
        assert applied.orchestrations == ()
    else:
        [leased] = applied.orchestrations
        assert ev.kind(leased.inbox[-1].event) == "taskCompleted"


async def test_enqueue_to_a_missing_instance_is_not_found(store: Backend) -> None:
    with pytest.raises(InstanceNotFound, match="'ghost'"):
        await store.apply(ops.send_event("ghost", ev.event_raised(now(), "x", None), now()))


async def test_purge_deletes_finished_trees_and_keeps_running_instances(
    store: Backend,
) -> None:
    for state in (
        new_state("root", status=Status.COMPLETED),
        new_state("kid", status=Status.COMPLETED, parent_instance_id="root"),
        new_state("running", status=Status.RUNNING),
    ):
        await create(store, state)
    assert await store.purge("running", recursive=False) == 0
    assert await store.purge("root", recursive=True) == 2
    assert await store.get_instance("root") is None
    assert await store.get_instance("kid") is None
    assert await store.get_instance("running") is not None


async def test_queries_page_newest_first_and_filter_by_name(store: SqliteBackend) -> None:
    base = now()
    for n in range(5):
        at = base + timedelta(seconds=n)
        name = "even" if n % 2 == 0 else "odd"
        await create(store, new_state(f"i{n}", name=name, created_at=at, last_updated_at=at))
    page, key = await store.query_instances(InstanceFilter(), 2, None, newest_first=True)
    assert [s.instance_id for s in page] == ["i4", "i3"]
    page, key = await store.query_instances(InstanceFilter(), 2, key, newest_first=True)
    assert [s.instance_id for s in page] == ["i2", "i1"]
    page, key = await store.query_instances(InstanceFilter(), 2, key, newest_first=True)
    assert [s.instance_id for s in page] == ["i0"] and key is None
    evens, _ = await store.query_instances(InstanceFilter(name="even"), 10, None)
    assert [s.instance_id for s in evens] == ["i0", "i2", "i4"]


async def test_counts_per_status_follow_the_filter(store: SqliteBackend) -> None:
    for instance_id, status in [
        ("a1", Status.COMPLETED),
        ("a2", Status.COMPLETED),
        ("a3", Status.FAILED),
        ("b1", Status.COMPLETED),
    ]:
        await create(store, new_state(instance_id, status=status))
    assert await store.count_instances(InstanceFilter()) == {
        Status.COMPLETED: 3,
        Status.FAILED: 1,
    }
    assert await store.count_instances(InstanceFilter(id_prefix="a")) == {
        Status.COMPLETED: 2,
        Status.FAILED: 1,
    }
    assert await store.count_instances(InstanceFilter(name="nobody")) == {}


@pytest.mark.sqlite_only
async def test_reopening_a_file_releases_leases_of_the_previous_process(
    tmp_path: pathlib.Path,
) -> None:
    path = str(tmp_path / "hub.sqlite3")
    first = SqliteBackend(path)
    await first.open()
    await create(first, new_state())
    assert await lease_one(first, "dead-process") is not None
    await first.close()
    second = SqliteBackend(path)
    await second.open()
    try:
        item = await lease_one(second, "new-process")
        assert item is not None and item.state.instance_id == "i1"
    finally:
        await second.close()
    mode = await trio.Path(path).stat()
    assert oct(mode.st_mode & 0o777) == "0o600"


@pytest.mark.sqlite_only
async def test_a_store_is_held_by_one_store_object_whatever_the_path_spelling(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "hub.sqlite3"
    first = SqliteBackend(str(path))
    await first.open()
    try:
        (tmp_path / "link.sqlite3").symlink_to(path)
        (tmp_path / "hard.sqlite3").hardlink_to(path)
        (tmp_path / "sub").mkdir()
        await create(first, new_state())
        item = await lease_one(first, "first")
        assert item is not None
        for spelling in ("hub.sqlite3", "link.sqlite3", "hard.sqlite3", "sub/../hub.sqlite3"):
            second = SqliteBackend(str(tmp_path / spelling))
            with pytest.raises(StoreUnavailable, match="in use by another store of this process"):
                await second.open()
        # the first one's lease is intact, and its sqlite locks too: it writes on
        await commit_step(first, item, StepResult(new_state(status=Status.RUNNING), (), []))
    finally:
        await first.close()
    second = SqliteBackend(str(tmp_path / "link.sqlite3"))
    await second.open()
    await second.close()
    assert sorted(p.name for p in await trio.Path(tmp_path).iterdir()) == [
        "hard.sqlite3",
        "hub.sqlite3",
        "link.sqlite3",
        "sub",
    ]


@pytest.mark.sqlite_only
async def test_a_file_that_open_created_is_removed_when_the_open_fails(
    tmp_path: pathlib.Path,
) -> None:
    # A path the OS takes and sqlite does not (longer than its 512 bytes).
    deep = tmp_path.joinpath(*["d" * 100] * 6)
    deep.mkdir(parents=True)
    store = SqliteBackend(str(deep / "hub.sqlite3"))
    with pytest.raises(StoreUnavailable, match="unable to open database file"):
        await store.open()
    assert list(await trio.Path(deep).iterdir()) == []


@pytest.mark.sqlite_only
async def test_an_empty_file_becomes_a_store_and_a_store_of_before_its_mark_opens(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "hub.sqlite3"
    path.touch()
    store = SqliteBackend(str(path))
    await store.open()
    await create(store, new_state())
    await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        conn.execute("PRAGMA application_id = 0")  # as stores were made before the mark
    store = SqliteBackend(str(path))
    await store.open()
    try:
        assert await store.get_instance("i1") is not None
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    "schema,what",
    [
        ("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)", "the tables notes"),
        ("CREATE TABLE instances (id INTEGER PRIMARY KEY)", "the tables instances"),
        ("PRAGMA user_version = 1; CREATE TABLE instances (instance_id TEXT)", "instances"),
        ("PRAGMA user_version = 7", "no table"),
        (f"PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 3", "newer dt-trio"),
    ],
)
async def test_a_database_that_is_not_a_store_is_refused_unchanged(
    tmp_path: pathlib.Path, schema: str, what: str
) -> None:
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(schema)
    before = path.read_bytes()
    store = SqliteBackend(str(path))
    with pytest.raises(StoreUnavailable, match=what):
        await store.open()
    assert path.read_bytes() == before
    assert [p.name for p in await trio.Path(tmp_path).iterdir()] == ["other.db"]


@pytest.mark.parametrize("kind", [k for k in STORE_KINDS if k != "memory"])
async def test_work_held_by_processes_that_died_is_not_poisoned_by_it(
    tmp_path: pathlib.Path, kind: str
) -> None:
    """A sidecar killed again and again while it holds work (no worker connected yet, say)
    has not tried that work: however many times it happens, the next lease is attempt 1."""
    stores = store_factory(kind, tmp_path)
    for life in range(12):
        store = stores()
        await store.open()
        try:
            if life == 0:
                await create(store, new_state())
                scheduled = ev.new_event(now(), 1)
                scheduled.taskScheduled.name = "act"
                item = await lease_one(store, "p")
                assert item is not None
                await commit_step(
                    store,
                    item,
                    StepResult(
                        state=item.state,
                        consumed=tuple(m.id for m in item.inbox),
                        history=[m.event for m in item.inbox],
                        activities=[ActivityTask("i1", "e0", scheduled)],
                    ),
                )
                await store.apply(ops.send_event("i1", ev.event_raised(now(), "e", None), now()))
            step = await lease_one(store, f"process {life}")
            activity = await lease_one_activity(store, f"process {life}")
            assert step is not None and step.attempt == 1
            assert activity is not None and activity.attempt == 1
        finally:
            await store.close()  # dies holding both leases


async def test_continue_as_new_queues_its_start_and_carryover_before_late_arrivals(
    store: Backend,
) -> None:
    await create(store, new_state())
    item = await lease_one(store, "me")
    assert item is not None
    # an event arrives while the step runs; the step continues as new carrying "kept"
    await store.apply(ops.send_event("i1", ev.event_raised(now(), "late", None), now()))
    fresh = dataclasses.replace(item.state, status=Status.RUNNING, execution_id="e1")
    await commit_step(
        store,
        item,
        StepResult(
            state=fresh,
            consumed=(item.inbox[0].id,),
            history=[],
            reset_history=True,
            messages=[
                OutboundMessage("i1", started(fresh)),
                OutboundMessage("i1", ev.event_raised(now(), "kept", None)),
            ],
        ),
    )
    step = await lease_one(store, "me")
    assert step is not None
    kinds = [ev.kind(m.event) or "" for m in step.inbox]
    names = [m.event.eventRaised.name for m in step.inbox if m.event.HasField("eventRaised")]
    assert kinds[0] == "executionStarted"
    assert names == ["kept", "late"]
    assert await store.get_history("i1") == []


@pytest.mark.sqlite_only
@pytest.mark.contract
async def test_queries_and_the_lease_are_served_by_indexes(tmp_path: pathlib.Path) -> None:
    """At 100,000 instances a scan would be slow; every hot statement must use an index.

    Contract: every hot statement uses an index, never a scan of the instances."""
    import sqlite3

    backend = SqliteBackend(str(tmp_path / "plan.sqlite3"))
    await backend.open()
    await backend.close()
    conn = sqlite3.connect(str(tmp_path / "plan.sqlite3"))
    statements = {
        "query by status": "SELECT instance_id FROM instances WHERE status IN (1, 3) "
        "AND (created_at, instance_id) > (0, '') ORDER BY created_at, instance_id LIMIT 100",
        "query by prefix": "SELECT instance_id FROM instances WHERE instance_id >= 'a' "
        "AND instance_id < 'b' ORDER BY created_at, instance_id LIMIT 100",
        "query newest first": "SELECT instance_id FROM instances WHERE (created_at, instance_id) "
        "< (9, 'z') ORDER BY created_at DESC, instance_id DESC LIMIT 50",
        "list finished": "SELECT completed_at, instance_id FROM instances WHERE completed_at IS "
        "NOT NULL AND status IN (1) ORDER BY completed_at, instance_id LIMIT 100",
        "get": "SELECT * FROM instances WHERE instance_id = 'x'",
        "history": "SELECT event FROM history WHERE instance_id = 'x' ORDER BY seq",
        "children": "SELECT instance_id FROM instances WHERE parent_instance_id IN ('x')",
        "inbox of one": "SELECT id FROM inbox WHERE instance_id = 'x' AND visible_at <= 1",
        "next activity": "SELECT id FROM activities WHERE leased_by IS NULL AND visible_at <= 1 "
        "ORDER BY visible_at, id LIMIT 1",
    }
    for what, sql in statements.items():
        plan = " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "USING" in plan and "SCAN instances" not in plan, f"{what}: {plan}"
    conn.close()


async def test_concurrent_writes_commit_together_and_a_failing_one_fails_alone(
    store: Backend,
) -> None:
    await create(store, new_state("taken"))
    outcomes: dict[str, str] = {}

    async def attempt(instance_id: str) -> None:
        try:
            await create(store, new_state(instance_id, input=f'"{instance_id}"'))
            outcomes[instance_id] = "created"
        except InstanceExists:
            outcomes[instance_id] = "exists"

    async with trio.open_nursery() as nursery:
        for instance_id in ["a", "b", "taken", "c", "d"]:
            nursery.start_soon(attempt, instance_id)
    assert outcomes == {
        "a": "created",
        "b": "created",
        "taken": "exists",
        "c": "created",
        "d": "created",
    }
    for instance_id in "abcd":
        loaded = await store.get_instance(instance_id)
        assert loaded is not None and loaded.input == f'"{instance_id}"'
    taken = await store.get_instance("taken")
    assert taken is not None and taken.input == '"x"'
    # The batch ran whole first, failed, and ran again write by write: the writer's cache
    # kept only what committed.
    assert await cache_problems(store) == []


async def test_leases_come_in_batches_earliest_first_and_never_twice(store: Backend) -> None:
    for i in range(5):
        await create(store, new_state(f"b{i}"))
    first = await store.lease_orchestrations("me", now(), 3)
    second = await store.lease_orchestrations("you", now(), 10)
    assert [w.state.instance_id for w in first] == ["b0", "b1", "b2"]
    assert [w.state.instance_id for w in second] == ["b3", "b4"]
    assert all(len(w.inbox) == 1 for w in first + second)
    assert await store.lease_orchestrations("late", now(), 10) == []


async def test_failed_attempts_count_until_a_step_commits_or_waits(store: Backend) -> None:
    await create(store, new_state())
    for _ in range(3):
        # leases given back untried (a stopping hub), like leases a killed sidecar held
        # before any worker saw them, do not count
        item = await lease_one(store, "me")
        assert item is not None and item.attempt == 1
        await store.apply(ops.release(item, now(), Attempts.KEEP))
    for expected in (1, 2, 3):
        item = await lease_one(store, "me")
        assert item is not None and item.attempt == expected
        await store.apply(ops.release(item, now(), Attempts.COUNT))
    item = await lease_one(store, "me")
    assert item is not None and item.attempt == 4
    ids = [m.id for m in item.inbox]
    await store.apply(ops.release(item, now(), Attempts.COUNT, ids, now()))
    item = await lease_one(store, "me")
    assert item is not None and item.attempt == 5
    # waiting was a decision: counting starts again
    await store.apply(ops.release(item, now(), Attempts.RESET, ids, now()))
    item = await lease_one(store, "me")
    assert item is not None and item.attempt == 1


@pytest.mark.sqlite_only
def test_the_instance_cache_keeps_only_what_commits() -> None:
    from dt_trio._store._sqlite._cache import InstanceCache as _InstanceCache

    t = now()
    a = (InstanceState("a", "o", "e", Status.RUNNING, t, t), (), 10)
    b = (InstanceState("b", "o", "e", Status.RUNNING, t, t), (), 10)
    cache = _InstanceCache(capacity=2, max_bytes=25)
    cache.put("a", a)
    assert cache.get("a") == a  # the transaction sees its own writes
    cache.rollback()
    assert cache.get("a") is None
    cache.put("a", a)
    mark = cache.mark()
    cache.put("a", None)  # a write that drops it, then fails: back to its savepoint
    cache.put("b", b)
    cache.undo_to(mark)
    assert (cache.get("a"), cache.get("b")) == (a, None)
    cache.commit()
    assert cache.get("a") == a
    cache.put("a", None)
    assert cache.get("a") is None  # dropped within the transaction
    cache.rollback()
    assert cache.get("a") == a  # ... which rolled back
    for key in ("b", "c", "d"):
        cache.put(key, b)
    cache.commit()
    assert cache.get("a") is None and cache.get("d") == b  # bounded: the oldest go first
    cache.put("d", (b[0], (), 20))  # a history that grew: the bytes bound evicts "c" too
    cache.commit()
    assert (cache.get("c"), cache.get("d")) == (None, (b[0], (), 20))


@pytest.mark.sqlite_only
def test_the_rows_of_finished_instances_are_kept_within_bounds() -> None:
    from dt_trio._store._sqlite._cache import InstanceCache as _InstanceCache

    t = now()
    running = (InstanceState("a", "o", "e", Status.RUNNING, t, t), (), 10)
    cache = _InstanceCache(capacity=2, max_bytes=100)
    cache.put("a", running)
    cache.commit()
    done = dataclasses.replace(running[0], status=Status.COMPLETED, output="x" * 40)
    cache.put("a", done)  # finished: no more steps to serve, the row for readers
    # readers see the committed row until the commit; a step, nothing to replay
    assert cache.get("a") is None and cache.row("a") == running[0]
    cache.commit()
    assert cache.get("a") is None and cache.row("a") == done
    cache.put("a", None)  # deleted
    cache.rollback()
    assert cache.row("a") == done  # ... by a transaction that rolled back
    for key in ("b", "c"):
        cache.put(key, dataclasses.replace(done, instance_id=key))
    cache.commit()
    assert cache.row("a") is None  # bounded in rows, the oldest go first
    cache.put("d", dataclasses.replace(done, instance_id="d", output="x" * 70))
    cache.commit()
    # bounded in rows (b goes) and in bytes (c too)
    assert (cache.row("b"), cache.row("c")) == (None, None)
    assert cache.row("d") is not None
    cache.put("d", running)  # running again (rewound, say)
    cache.commit()
    assert cache.row("d") == running[0] and cache.get("d") == running


async def _one_write(
    store: SqliteBackend,
    value: int,
    gate: threading.Event | None = None,
    entered: threading.Event | None = None,
) -> int:
    def write(conn: sqlite3.Connection) -> int:
        if entered is not None:
            entered.set()
        if gate is not None:
            assert gate.wait(5), "the test never opened the gate"
        conn.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER)")
        conn.execute("INSERT INTO t VALUES (?)", (value,))
        return value

    return await store._db.write(write)


@pytest.mark.sqlite_only
async def test_with_the_writer_running_a_write_returns_once_its_own_batch_is_committed() -> None:
    store = SqliteBackend("")
    await store.open()
    entered, first_gate, second_gate = threading.Event(), threading.Event(), threading.Event()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            first_done = trio.Event()

            async def first() -> None:
                await _one_write(store, 1, first_gate, entered)
                first_done.set()

            nursery.start_soon(first)
            assert await trio.to_thread.run_sync(entered.wait, 5)
            # queued while the first batch runs: the next batch, held in the thread
            nursery.start_soon(_one_write, store, 2, second_gate)
            await trio.testing.wait_all_tasks_blocked()
            first_gate.set()
            with trio.fail_after(5):
                # Without the writer task, the first write's caller drives the batches and
                # waits for the second, held one too.
                await first_done.wait()
            second_gate.set()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    finally:
        first_gate.set()
        second_gate.set()
        await store.close()


@pytest.mark.sqlite_only
@pytest.mark.contract
async def test_writes_queued_during_a_commit_follow_it_in_the_writer_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch after a commit starts in the writer's thread as soon as that commit is
    made: one hand-off to the thread, not one per batch with a turn of the event loop
    between them.

    Contract: one hand-off to the writer thread for back-to-back batches."""
    store = SqliteBackend("")
    await store.open()
    hand_offs = 0
    run_sync = trio.to_thread.run_sync

    async def counted(fn: Any, *args: Any, limiter: Any = None, **kw: Any) -> Any:
        nonlocal hand_offs
        hand_offs += limiter is store._db._write_limiter
        return await run_sync(fn, *args, limiter=limiter, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    entered, gate = threading.Event(), threading.Event()
    results: list[int] = []
    all_done = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)

            async def write(value: int, *args: threading.Event) -> None:
                results.append(await _one_write(store, value, *args))
                if len(results) == 3:
                    all_done.set()

            nursery.start_soon(write, 1, gate, entered)
            assert await trio.to_thread.run_sync(entered.wait, 5)
            for value in (2, 3):  # queued while the first batch runs
                nursery.start_soon(write, value)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
            with trio.fail_after(5):
                await all_done.wait()
            assert sorted(results) == [1, 2, 3]
            assert hand_offs == 1
            nursery.cancel_scope.cancel()
    finally:
        gate.set()
        await store.close()


@pytest.mark.sqlite_only
async def test_writes_queued_when_the_writer_stops_are_committed() -> None:
    store = SqliteBackend("")
    await store.open()
    results: list[int] = []
    async with trio.open_nursery() as outer:
        await outer.start(store.run)

        async def write(value: int) -> None:
            with trio.CancelScope(shield=True):
                results.append(await _one_write(store, value))

        async with trio.open_nursery() as writers:
            for value in range(20):
                writers.start_soon(write, value)
            await trio.lowlevel.checkpoint()
            outer.cancel_scope.cancel()  # the writer stops while writes are queued
    assert sorted(results) == list(range(20))

    def count(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT COUNT(*) FROM t").fetchone()[0])

    assert await store._db.write(count) == 20  # no writer now: this caller drives
    await store.close()


# The schema of version 1 (dt-trio before lease epochs), as such stores were written.
SCHEMA_1 = """
PRAGMA user_version = 1;
CREATE TABLE instances (
    instance_id TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT,
    execution_id TEXT NOT NULL, status INTEGER NOT NULL, input TEXT, output TEXT,
    custom_status TEXT, failure BLOB, created_at INTEGER NOT NULL,
    last_updated_at INTEGER NOT NULL, completed_at INTEGER, scheduled_start_at INTEGER,
    parent_instance_id TEXT, tags TEXT, trace_context BLOB, locked_by TEXT,
    dequeue_count INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX instances_parent ON instances (parent_instance_id)
    WHERE parent_instance_id IS NOT NULL;
CREATE INDEX instances_created ON instances (created_at, instance_id);
CREATE INDEX instances_status_created ON instances (status, created_at, instance_id);
CREATE INDEX instances_completed ON instances (completed_at, instance_id)
    WHERE completed_at IS NOT NULL;
CREATE TABLE history (
    instance_id TEXT NOT NULL, seq INTEGER NOT NULL, event BLOB NOT NULL,
    PRIMARY KEY (instance_id, seq)
) WITHOUT ROWID;
CREATE TABLE inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, instance_id TEXT NOT NULL, event BLOB NOT NULL,
    visible_at INTEGER NOT NULL
);
CREATE INDEX inbox_visible ON inbox (visible_at);
CREATE INDEX inbox_instance ON inbox (instance_id, visible_at);
CREATE TABLE activities (
    id INTEGER PRIMARY KEY AUTOINCREMENT, instance_id TEXT NOT NULL,
    execution_id TEXT NOT NULL, event BLOB NOT NULL, visible_at INTEGER NOT NULL,
    locked_by TEXT, dequeue_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX activities_ready ON activities (locked_by, visible_at);
CREATE INDEX activities_instance ON activities (instance_id);
CREATE TABLE entities (
    instance_id TEXT PRIMARY KEY, state TEXT, last_modified_at INTEGER NOT NULL,
    locked_by TEXT, lock_owner TEXT, leased_by TEXT,
    dequeue_count INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE entity_inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, instance_id TEXT NOT NULL, event BLOB NOT NULL,
    visible_at INTEGER NOT NULL, deferred INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX entity_inbox_ready ON entity_inbox (deferred, visible_at);
CREATE INDEX entity_inbox_instance ON entity_inbox (instance_id, visible_at);
"""


@pytest.mark.sqlite_only
async def test_a_store_of_the_first_schema_opens_with_its_work_and_failed_attempts(
    tmp_path: pathlib.Path,
) -> None:
    """A store written before lease epochs (schema 1), left by a process that died holding
    leases: it opens, its work is there to lease with the attempts it had failed, and what
    runs on it commits."""
    from dt_trio._core import signal_event

    path = str(tmp_path / "old.sqlite3")
    state = new_state(status=Status.RUNNING)
    scheduled = ev.new_event(now(), 1)
    scheduled.taskScheduled.name = "act"
    t = 1_700_000_000_000_000
    old = sqlite3.connect(path)
    old.executescript(SCHEMA_1)
    old.execute(
        "INSERT INTO instances (instance_id, name, execution_id, status, created_at, "
        "last_updated_at, locked_by, dequeue_count) VALUES ('i1', 'orch', 'e0', 0, ?, ?, "
        "'dead', 2)",
        (t, t),
    )
    old.execute("INSERT INTO history VALUES ('i1', 0, ?)", (started(state).SerializeToString(),))
    old.execute(
        "INSERT INTO inbox (instance_id, event, visible_at) VALUES ('i1', ?, ?)",
        (ev.event_raised(now(), "go", None).SerializeToString(), t),
    )
    old.execute(
        "INSERT INTO activities (instance_id, execution_id, event, visible_at, locked_by, "
        "dequeue_count) VALUES ('i1', 'e0', ?, ?, 'dead', 1)",
        (scheduled.SerializeToString(), t),
    )
    signal = signal_event(now(), "@c@k", "add", "1", "r")
    old.execute(
        "INSERT INTO entities (instance_id, last_modified_at, leased_by) VALUES ('@c@k', ?, "
        "'dead')",
        (t,),
    )
    old.execute(
        "INSERT INTO entity_inbox (instance_id, event, visible_at) VALUES ('@c@k', ?, ?)",
        (signal.SerializeToString(), t),
    )
    old.commit()
    old.close()

    store = SqliteBackend(path)
    await store.open()
    try:
        item = await lease_one(store, "me")
        assert item is not None and item.attempt == 3 and item.lease.epoch >= 1
        assert [ev.kind(e) for e in item.history] == ["executionStarted"]
        activity = await lease_one_activity(store, "me")
        assert activity is not None and activity.attempt == 2
        [entity] = await store.lease_entities("me", now(), 10)
        assert [m.event.entityOperationSignaled.operation for m in entity.inbox] == ["add"]
        step = StepResult(state=item.state, consumed=(item.inbox[0].id,), history=[])
        await commit_step(store, item, step)
        await store.apply(ops.deliver_result(activity, ev.task_completed(now(), 1, "1"), now()))
        again = await lease_one(store, "me")
        assert again is not None and again.attempt == 1
        assert [ev.kind(m.event) for m in again.inbox] == ["taskCompleted"]
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM activities WHERE leased_by IS NULL "
            "AND visible_at <= 1 ORDER BY visible_at, id LIMIT 1"
        ).fetchall()
        assert "activities_ready" in " ".join(row[3] for row in plan)
    finally:
        conn.close()
