"""The PostgreSQL store through the store contract, with commits built by hand: what one store
does, and what several stores on one database (several sidecars) do to each other."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import _postgres
import _values
import psycopg
import pytest
import trio
import trio.testing
from _values import new_state, now, started

from dt_trio._core import (
    ActivityTask,
    EntityState,
    EntityStepResult,
    InstanceState,
    NewInstance,
    OutboundMessage,
    Status,
    StepResult,
    signal_event,
)
from dt_trio._core import _events as ev
from dt_trio._core import _operations as ops
from dt_trio._core._commit import (
    Attempts,
    Commit,
    Creatable,
    CreateInstance,
    DeleteActivity,
    Exists,
    Holds,
    Lease,
    OrchestrationWorkItem,
    Release,
    Send,
    TakeActivities,
    TakeInstance,
    WorkKind,
    WriteEntityStep,
    WriteStep,
)
from dt_trio._engine import Signals
from dt_trio._errors import (
    InstanceExists,
    InstanceNotFound,
    InvalidRequest,
    LockLost,
    StoreUnavailable,
)
from dt_trio._proto import orchestrator_service_pb2 as pb
from dt_trio._store import FinishedFilter
from dt_trio._store._postgres import PostgresBackend
from dt_trio._store._postgres._store import BATCH_LIMIT, WRITERS

pytestmark = pytest.mark.postgres_only

ME = "me:1:aaaa"
YOU = "you:2:bbbb"


def create(state: InstanceState, take: str | None = None, at: datetime | None = None) -> Commit:
    return Commit(
        now=now(),
        guards=(Creatable(state.instance_id, frozenset(s for s in Status if s.is_terminal)),),
        writes=(CreateInstance(state, started(state), at or state.created_at),),
        take=(TakeInstance(take, state.instance_id),) if take else (),
    )


def step(item: OrchestrationWorkItem, handed: int = 0, owner: str = ME, **result: object) -> Commit:
    values: dict[str, object] = dict(
        state=dataclasses.replace(item.state, status=Status.RUNNING, last_updated_at=now()),
        consumed=tuple(m.id for m in item.inbox),
        history=[ev.orchestrator_started(now()), *(m.event for m in item.inbox)],
    )
    values.update(result)
    return Commit(
        now=now(),
        guards=(Holds(WorkKind.ORCHESTRATION, item.state.instance_id, item.lease),),
        writes=(WriteStep(StepResult(**values)),),  # type: ignore[arg-type]
        take=(TakeActivities(owner, handed),) if handed else (),
    )


def scheduled(task_id: int, name: str = "act") -> pb.HistoryEvent:
    event = ev.new_event(now(), task_id)
    event.taskScheduled.name = name
    return event


@dataclasses.dataclass
class Hub:
    """A store as a sidecar has it: open, its duties running, its wake-ups recorded."""

    store: PostgresBackend
    signals: Signals


def store_for(address: str, hub: str, **kw: object) -> Hub:
    signals = Signals()
    return Hub(PostgresBackend(address, hub, listener=signals, **kw), signals)  # type: ignore[arg-type]


@pytest.fixture
def hub_name(pg_address: str) -> str:
    return _postgres.new_hub()


@pytest.fixture
async def store(pg_address: str, hub_name: str) -> AsyncIterator[PostgresBackend]:
    backend = PostgresBackend(pg_address, hub_name)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def two(pg_address: str, hub_name: str) -> AsyncIterator[tuple[Hub, Hub]]:
    """Two sidecars' stores on one hub, with their duties running."""
    a = store_for(pg_address, hub_name)
    b = store_for(pg_address, hub_name)
    await a.store.open()
    await b.store.open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.store.run)
            await nursery.start(b.store.run)
            yield a, b
            nursery.cancel_scope.cancel()
    finally:
        await a.store.close()
        await b.store.close()


async def lease_one(store: PostgresBackend, owner: str = ME) -> OrchestrationWorkItem | None:
    items = await store.lease_orchestrations(owner, now(), 1)
    return items[0] if items else None


# -- one store ---------------------------------------------------------------------------------


async def test_the_address_is_described_without_its_password(pg_address: str) -> None:
    store = PostgresBackend("postgresql://bob:secret@db.example:6543/hubs", "default")
    assert store.description == "postgres::db.example:6543/hubs"
    assert "secret" not in PostgresBackend("postgresql://bob:secret@h/d", "orders").description


async def test_a_created_instance_reads_back_with_every_field_and_is_handed_over(
    store: PostgresBackend,
) -> None:
    state = new_state(scheduled_start_at=now(), parent_instance_id="p")
    applied = await store.apply(create(state, take=ME))
    assert await store.get_instance("i1") == state
    [item] = applied.orchestrations
    assert item.state == state and item.history == [] and item.lease.owner == ME
    assert [ev.kind(m.event) for m in item.inbox] == ["executionStarted"]
    assert await lease_one(store, YOU) is None  # held by the hand-over


async def test_creating_over_a_running_instance_is_refused_and_a_finished_one_replaced(
    store: PostgresBackend,
) -> None:
    await store.apply(create(new_state()))
    with pytest.raises(InstanceExists):
        await store.apply(create(new_state(input='"other"')))
    assert (await store.get_instance("i1")).input == '"x"'  # type: ignore[union-attr]
    item = await lease_one(store)
    assert item is not None
    done = dataclasses.replace(item.state, status=Status.COMPLETED, completed_at=now())
    await store.apply(step(item, state=done))
    await store.apply(create(new_state(input='"again"')))
    assert (await store.get_instance("i1")).status == Status.PENDING  # type: ignore[union-attr]
    assert await store.get_history("i1") == []


async def test_a_step_appends_history_hands_over_activities_and_sends_its_outbox(
    store: PostgresBackend,
) -> None:
    await store.apply(create(new_state()))
    await store.apply(create(new_state("target")))
    item = await lease_one(store)
    assert item is not None and item.state.instance_id == "i1"
    assert await lease_one(store, YOU) is not None  # "target": i1 is not leased twice
    timer_at = now() + timedelta(minutes=5)
    child = new_state("child", parent_instance_id="i1")
    tasks = [scheduled(i) for i in range(3)]
    applied = await store.apply(
        step(
            item,
            handed=2,
            history=[ev.orchestrator_started(now()), item.inbox[0].event, *tasks],
            activities=[ActivityTask("i1", "e0", t) for t in tasks],
            messages=[
                OutboundMessage("i1", ev.timer_fired(now(), 9, timer_at), timer_at),
                OutboundMessage("target", ev.event_raised(now(), "ping", None)),
                OutboundMessage("nobody", ev.event_raised(now(), "lost", None)),
            ],
            new_instances=[
                NewInstance(
                    child, started(child), OutboundMessage("i1", ev.event_raised(now(), "x", None))
                )
            ],
        )
    )
    assert [a.scheduled.eventId for a in applied.activities] == [0, 1]
    assert all(a.lease.owner == ME and a.lease.epoch >= 1 for a in applied.activities)
    assert applied.waiting and applied.dropped == 1
    history = await store.get_history("i1")
    assert [ev.kind(e) for e in history][:2] == ["orchestratorStarted", "executionStarted"]
    assert len(history) == 5
    # the child is leasable now; i1 only when its timer fires: the lease says when
    leased = await store.lease_orchestrations(ME, now(), 10)
    assert [w.state.instance_id for w in leased] == ["child"]
    assert leased.next_at == timer_at
    activities = await store.lease_activities(ME, now(), 10)
    assert [a.scheduled.eventId for a in activities] == [2]  # the third; two were handed over


async def test_a_commit_without_the_lease_is_refused_and_changes_nothing(
    store: PostgresBackend,
) -> None:
    await store.apply(create(new_state()))
    item = await lease_one(store)
    assert item is not None
    stale = dataclasses.replace(item, lease=Lease(ME, item.lease.epoch - 1))
    with pytest.raises(LockLost):
        await store.apply(step(stale))
    with pytest.raises(LockLost):
        await store.apply(step(dataclasses.replace(item, lease=Lease(YOU, item.lease.epoch))))
    assert await store.get_history("i1") == []
    await store.apply(step(item))
    assert len(await store.get_history("i1")) == 2


async def queued_behind_held_rows(
    store: PostgresBackend,
    pg_address: str,
    held: list[OrchestrationWorkItem],
    commits: list[Commit],
) -> list[BaseException | None]:
    """Apply `commits` together, in one batch, with the store's duties running (its writers):
    steps of `held` (one per writer) go first, one by one, and wait for their instances' rows,
    which another program holds, while `commits` queue behind them; then the rows are let go.
    What each of `commits` raised (None: applied)."""
    assert len(held) == WRITERS
    store._outbox.take()  # (what was to be told the other sidecars would go in a pipeline)
    outcomes: list[BaseException | None] = [None] * len(commits)
    blocker = psycopg.connect(pg_address)
    try:
        async with trio.open_nursery() as duties:
            await duties.start(store.run)
            pipelines = await _held_and_queued(store, blocker, held, commits, outcomes)
            duties.cancel_scope.cancel()
    finally:
        blocker.close()
    # the held steps' batches, and all of `commits` in one round trip
    assert store.counts.pipelines == pipelines + len(held) + 1
    return outcomes


async def _held_and_queued(
    store: PostgresBackend,
    blocker: psycopg.Connection[Any],
    held: list[OrchestrationWorkItem],
    commits: list[Commit],
    outcomes: list[BaseException | None],
) -> int:
    """Hold `held`'s rows, queue `commits` behind their steps, let go: the pipelines
    count before the let-go."""
    blocker.execute(
        f"SELECT 1 FROM {store.schema}.instances WHERE instance_id = ANY(%s) FOR UPDATE",
        ([h.state.instance_id for h in held],),
    )
    async with trio.open_nursery() as nursery:
        for n, h in enumerate(held, 1):
            nursery.start_soon(store.apply, step(h))
            with trio.fail_after(10):
                while True:  # until the step waits for its row
                    waiting = blocker.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE application_name = 'dt-trio writer' "
                        "AND wait_event_type = 'Lock'"
                    ).fetchone()
                    if waiting and waiting[0] == n:
                        break
                    await trio.sleep(0.01)

        async def apply(i: int, commit: Commit) -> None:
            try:
                await store.apply(commit)
            except Exception as exc:
                outcomes[i] = exc

        for i, commit in enumerate(commits):
            nursery.start_soon(apply, i, commit)
        await trio.testing.wait_all_tasks_blocked()
        assert len(store._queue) == len(commits)
        pipelines = store.counts.pipelines
        blocker.rollback()
    return pipelines


async def leased(store: PostgresBackend, *ids: str) -> list[OrchestrationWorkItem]:
    for i in ids:
        await store.apply(create(new_state(i)))
    items = await store.lease_orchestrations(ME, now(), len(ids))
    assert [item.state.instance_id for item in items] == list(ids)
    return list(items)


async def test_a_stale_commit_in_a_batch_is_refused_alone(
    store: PostgresBackend, pg_address: str
) -> None:
    *held, a, b, c = await leased(store, "held1", "held2", "a", "b", "c")
    stale = dataclasses.replace(b, lease=Lease(ME, b.lease.epoch - 1))
    outcomes = await queued_behind_held_rows(
        store, pg_address, held, [step(a), step(stale), step(c)]
    )
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], LockLost)
    assert len(await store.get_history("a")) == 2 and len(await store.get_history("c")) == 2
    assert await store.get_history("b") == []  # the stale one wrote nothing
    await store.apply(step(b))  # the lease it had is still good
    assert len(await store.get_history("b")) == 2


async def test_a_failed_commit_in_a_batch_fails_alone_and_the_others_are_written_once(
    store: PostgresBackend, pg_address: str
) -> None:
    import random
    import string

    from dt_trio._errors import InvalidRequest

    # an entity whose id is beyond an index entry: the server refuses the step that signals it
    huge = "@e@" + "".join(random.choices(string.ascii_letters, k=10_000))
    *held, a, bad, b = await leased(store, "held1", "held2", "a", "bad", "b")
    signal = OutboundMessage(huge, ev.event_raised(now(), "op", None))
    outcomes = await queued_behind_held_rows(
        store, pg_address, held, [step(a), step(bad, messages=[signal]), step(b)]
    )
    # the server skipped what followed the bad one: written after it, on its own
    assert isinstance(outcomes[1], InvalidRequest)
    assert outcomes[0] is None and outcomes[2] is None  # a's step not written twice
    assert len(await store.get_history("a")) == 2 and len(await store.get_history("b")) == 2
    assert await store.get_history("bad") == []


async def test_messages_to_a_gone_execution_or_instance_are_dropped_and_counted(
    store: PostgresBackend,
) -> None:
    await store.apply(create(new_state()))
    applied = await store.apply(
        Commit(
            now=now(),
            writes=(
                Send(
                    (
                        OutboundMessage("i1", ev.event_raised(now(), "a", None), execution_id="e0"),
                        OutboundMessage(
                            "i1", ev.event_raised(now(), "b", None), execution_id="old"
                        ),
                        OutboundMessage("ghost", ev.event_raised(now(), "c", None)),
                    )
                ),
            ),
        )
    )
    assert applied.dropped == 2
    item = await lease_one(store)
    assert item is not None
    assert [m.event.eventRaised.name for m in item.inbox[1:]] == ["a"]
    with pytest.raises(InstanceNotFound):
        await store.apply(Commit(now=now(), guards=(Exists("ghost"),), writes=()))


async def test_a_postponed_step_hides_its_messages_until_then(store: PostgresBackend) -> None:
    await store.apply(create(new_state()))
    item = await lease_one(store)
    assert item is not None
    later = now() + timedelta(hours=1)
    await store.apply(
        Commit(
            now=now(),
            writes=(
                Release(
                    WorkKind.ORCHESTRATION,
                    "i1",
                    item.lease,
                    Attempts.COUNT,
                    tuple(m.id for m in item.inbox),
                    later,
                ),
            ),
        )
    )
    leased = await store.lease_orchestrations(ME, now(), 5)
    assert list(leased) == [] and leased.next_at == later
    again = await store.lease_orchestrations(ME, later, 5)
    assert [w.attempt for w in again] == [2]
    # a release of a lease that is no longer held changes nothing
    await store.apply(
        Commit(
            now=now(), writes=(Release(WorkKind.ORCHESTRATION, "i1", item.lease, Attempts.COUNT),)
        )
    )
    assert await lease_one(store, YOU) is None


async def test_an_activity_result_reaches_its_execution_and_hands_the_instance_over(
    store: PostgresBackend,
) -> None:
    await store.apply(create(new_state()))
    item = await lease_one(store)
    assert item is not None
    task = scheduled(1)
    await store.apply(step(item, history=[task], activities=[ActivityTask("i1", "e0", task)]))
    [activity] = await store.lease_activities(ME, now(), 5)
    assert activity.attempt == 1
    applied = await store.apply(
        Commit(
            now=now(),
            guards=(Holds(WorkKind.ACTIVITY, activity.id, activity.lease),),
            writes=(
                DeleteActivity(activity.id),
                Send(
                    (OutboundMessage("i1", ev.task_completed(now(), 1, '"ok"'), execution_id="e0"),)
                ),
            ),
            take=(TakeInstance(ME, "i1"),),
        )
    )
    [taken] = applied.orchestrations
    assert [ev.kind(e) for e in taken.history] == ["taskScheduled"]
    assert [ev.kind(m.event) for m in taken.inbox] == ["taskCompleted"]
    with pytest.raises(LockLost):  # the activity is gone with its lease
        await store.apply(
            Commit(
                now=now(),
                guards=(Holds(WorkKind.ACTIVITY, activity.id, activity.lease),),
                writes=(DeleteActivity(activity.id),),
            )
        )


async def test_continue_as_new_queues_its_start_and_carryover_before_late_arrivals(
    store: PostgresBackend,
) -> None:
    await store.apply(create(new_state()))
    item = await lease_one(store)
    assert item is not None
    await store.apply(
        Commit(
            now=now(),
            writes=(Send((OutboundMessage("i1", ev.event_raised(now(), "late", None)),)),),
        )
    )
    fresh = dataclasses.replace(item.state, status=Status.RUNNING, execution_id="e1")
    await store.apply(
        step(
            item,
            state=fresh,
            history=[],
            reset_history=True,
            messages=[
                OutboundMessage("i1", started(fresh)),
                OutboundMessage("i1", ev.event_raised(now(), "kept", None)),
            ],
        )
    )
    again = await lease_one(store)
    assert again is not None
    assert ev.kind(again.inbox[0].event) == "executionStarted"
    names = [m.event.eventRaised.name for m in again.inbox if m.event.HasField("eventRaised")]
    assert names == ["kept", "late"]


async def test_an_entity_is_leased_for_its_messages_but_not_for_deferred_ones(
    store: PostgresBackend,
) -> None:
    entity_id = "@counter@a"

    async def signal(op: str) -> None:
        message = OutboundMessage(entity_id, signal_event(now(), entity_id, op, None, op))
        await store.apply(Commit(now=now(), writes=(Send((message,)),)))

    await signal("add")
    [item] = await store.lease_entities(ME, now(), 5)
    assert [m.id for m in item.inbox] and item.entity.backlog == 1
    await signal("get")  # arrives while the batch runs
    first = item.inbox[0].id
    await store.apply(
        Commit(
            now=now(),
            guards=(Holds(WorkKind.ENTITY, entity_id, item.lease),),
            writes=(
                WriteEntityStep(
                    EntityStepResult(
                        entity=EntityState(entity_id, now(), state="1"),
                        consumed=(first,),
                        deferred=(),
                    )
                ),
            ),
        )
    )
    [again] = await store.lease_entities(ME, now(), 5)
    assert [m.event for m in again.inbox] and again.entity.state == "1"
    # the rest deferred: not a reason to lease the entity again
    await store.apply(
        Commit(
            now=now(),
            guards=(Holds(WorkKind.ENTITY, entity_id, again.lease),),
            writes=(
                WriteEntityStep(
                    EntityStepResult(
                        entity=again.entity, consumed=(), deferred=tuple(m.id for m in again.inbox)
                    )
                ),
            ),
        )
    )
    assert list(await store.lease_entities(ME, now(), 5)) == []
    assert (await store.get_entity(entity_id)).backlog == 1  # type: ignore[union-attr]


async def test_queries_page_by_creation_and_purges_take_finished_trees(
    store: PostgresBackend,
) -> None:
    from dt_trio._store import InstanceFilter

    for i in range(5):
        await store.apply(create(new_state(f"q{i}")))
    page, key = await store.query_instances(InstanceFilter(id_prefix="q"), 2, None)
    assert [s.instance_id for s in page] == ["q0", "q1"] and key is not None
    page, key = await store.query_instances(InstanceFilter(id_prefix="q"), 10, key)
    assert [s.instance_id for s in page] == ["q2", "q3", "q4"] and key is None
    assert await store.purge("q0", recursive=True) == 0  # running: kept
    items = await store.lease_orchestrations(ME, now(), 10)
    for item in items:
        done = dataclasses.replace(item.state, status=Status.COMPLETED, completed_at=now())
        await store.apply(step(item, state=done))
    ids, _ = await store.list_finished_ids(FinishedFilter(), 10, None)
    assert sorted(ids) == [f"q{i}" for i in range(5)]
    assert await store.purge_where(InstanceFilter(), False, 2, None) == (5, True)
    assert await store.get_instance("q1") is None


async def test_the_commits_made_by_functions_write_what_the_general_path_writes(
    pg_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    later = t0 + timedelta(hours=1)
    # the same events both ways
    monkeypatch.setitem(globals(), "now", lambda: t0)
    monkeypatch.setattr(_values, "now", lambda: t0)
    dumps = []
    answers: list[object] = []
    for functions in (True, False):
        store = PostgresBackend(pg_address, _postgres.new_hub(), functions=functions)
        await store.open()
        try:
            for instance_id in ("i1", "target", "other"):
                state = new_state(instance_id, created_at=t0, last_updated_at=t0)
                await store.apply(dataclasses.replace(create(state), now=t0))
            [item, *_] = await store.lease_orchestrations(ME, t0, 1)
            tasks = [scheduled(i) for i in range(3)]
            commit = step(
                item,
                handed=2,
                state=dataclasses.replace(item.state, status=Status.RUNNING, last_updated_at=t0),
                history=[ev.orchestrator_started(t0), *tasks],
                activities=[ActivityTask("i1", "e0", t) for t in tasks],
                messages=[
                    OutboundMessage("i1", ev.timer_fired(t0, 9, later), later),
                    OutboundMessage("target", ev.event_raised(t0, "ping", None)),
                    OutboundMessage("other", ev.event_raised(t0, "old", None), None, "gone"),
                    OutboundMessage("nobody", ev.event_raised(t0, "lost", None)),
                    OutboundMessage("@e@k", signal_event(t0, "@e@k", "op", None, "r1"), t0),
                ],
            )
            applied = await store.apply(dataclasses.replace(commit, now=t0))
            answers.append((applied.waiting, applied.dropped, [a.id for a in applied.activities]))
            for leased in await store.lease_orchestrations(ME, t0, 5):
                await store.apply(dataclasses.replace(step(leased, state=leased.state), now=t0))
            # the activities' results: one to a gone execution, one taking its instance
            [first, second] = applied.activities
            [third] = await store.lease_activities(ME, t0, 5)
            for activity, execution, take in ((first, "gone", None), (second, "e0", ME)):
                result = ev.task_completed(t0, activity.scheduled.eventId, '"ok"')
                delivered = await store.apply(
                    ops.deliver_result(
                        dataclasses.replace(activity, execution_id=execution), result, t0, take
                    )
                )
                answers.append(
                    (delivered.dropped, [o.state.instance_id for o in delivered.orchestrations])
                )
            with pytest.raises(LockLost):
                await store.apply(ops.deliver_result(first, ev.task_completed(t0, 0, None), t0))
            answers.append(
                [m.event.HasField("taskCompleted") for m in delivered.orchestrations[0].inbox]
            )
            await store.apply(ops.release_activity(third, t0, Attempts.KEEP))
            with psycopg.connect(pg_address) as conn:
                schema = f"{store.schema}"
                dump = {}
                # (messages to different instances may draw their ids in another order)
                for table, order in (
                    ("instances", "instance_id"),
                    ("history", "instance_id, seq"),
                    ("inbox", "instance_id, id"),
                    ("activities", "id"),
                    ("entities", "instance_id"),
                    ("entity_inbox", "instance_id, id"),
                ):
                    rows = conn.execute(f"SELECT * FROM {schema}.{table} ORDER BY {order}")
                    names = [d.name for d in rows.description or ()]
                    ignored = {"lease_until", "id"} if "inbox" in table else {"lease_until"}
                    dump[table] = [
                        {k: v for k, v in zip(names, r, strict=True) if k not in ignored}
                        for r in rows.fetchall()
                    ]
                dumps.append(dump)
        finally:
            await store.close()
    assert answers[:4] == answers[4:]
    assert answers[:4] == [(True, 2, [1, 2]), (1, []), (0, ["i1"]), [True]]
    assert dumps[0] == dumps[1]
    assert [r["instance_id"] for r in dumps[0]["inbox"]] == ["i1", "i1"]  # the timer, a result


# -- the schema ----------------------------------------------------------------------------------


async def test_three_sidecars_starting_at_once_create_the_schema_once(
    pg_address: str, hub_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    stores = [PostgresBackend(pg_address, hub_name) for _ in range(3)]
    with caplog.at_level(logging.INFO, "dt_trio._store._postgres._schema"):
        async with trio.open_nursery() as nursery:
            for s in stores:
                nursery.start_soon(s.open)
    try:
        created = [r for r in caplog.records if "created the task hub schema" in r.getMessage()]
        assert len(created) == 1
        with psycopg.connect(pg_address) as conn:
            rows = conn.execute(
                f"SELECT count(*) FROM dt_trio_{hub_name}.schema_version"
            ).fetchone()
        assert rows == (1,)
        await stores[0].apply(create(new_state()))
        assert await stores[2].get_instance("i1") is not None
    finally:
        for s in stores:
            await s.close()


async def test_a_schema_made_by_a_newer_dt_trio_is_refused(pg_address: str, hub_name: str) -> None:
    first = PostgresBackend(pg_address, hub_name)
    await first.open()
    await first.close()
    with psycopg.connect(pg_address, autocommit=True) as conn:
        conn.execute(f"UPDATE dt_trio_{hub_name}.schema_version SET version = 99")
    with pytest.raises(StoreUnavailable, match=r"newer dt-trio \(schema version 99"):
        await PostgresBackend(pg_address, hub_name).open()


async def test_a_schema_of_foreign_tables_is_refused(pg_address: str, hub_name: str) -> None:
    with psycopg.connect(pg_address, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA dt_trio_{hub_name}")
        conn.execute(f"CREATE TABLE dt_trio_{hub_name}.orders (id int)")
    with pytest.raises(StoreUnavailable, match="not a dt-trio task hub"):
        await PostgresBackend(pg_address, hub_name).open()


async def test_hubs_share_a_database_without_seeing_each_other(pg_address: str) -> None:
    a = PostgresBackend(pg_address, _postgres.new_hub())
    b = PostgresBackend(pg_address, _postgres.new_hub())
    await a.open()
    await b.open()
    try:
        await a.apply(create(new_state()))
        assert await b.get_instance("i1") is None
        assert list(await b.lease_orchestrations(ME, now(), 5)) == []
    finally:
        await a.close()
        await b.close()


# -- several sidecars ----------------------------------------------------------------------------


async def test_a_stale_owners_commit_is_refused_once_another_took_the_work(
    pg_address: str, hub_name: str
) -> None:
    a = store_for(pg_address, hub_name, lease_ttl=0.3)  # never renewed: its run() is not started
    b = store_for(pg_address, hub_name)
    await a.store.open()
    await b.store.open()
    try:
        await a.store.apply(create(new_state()))
        stale = await lease_one(a.store, ME)
        assert stale is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(b.store.run)  # its poll clears the expired lease
            taken: list[OrchestrationWorkItem] = []

            async def take() -> bool:
                taken.extend(await b.store.lease_orchestrations(YOU, now(), 1))
                return bool(taken)

            with trio.fail_after(10):
                while not await take():
                    b.signals.orchestration_work.clear()
                    await b.signals.orchestration_work.wait()
            nursery.cancel_scope.cancel()
        assert taken[0].lease.epoch == stale.lease.epoch + 1
        with pytest.raises(LockLost):
            await a.store.apply(step(stale))
        await a.store.apply(
            Commit(now=now(), writes=(Release(WorkKind.ORCHESTRATION, "i1", stale.lease),))
        )
        assert await b.store.get_history("i1") == []
        await b.store.apply(step(taken[0], owner=YOU))
        assert len(await b.store.get_history("i1")) == 2
    finally:
        await a.store.close()
        await b.store.close()


async def test_renewed_leases_outlive_their_time_to_live(pg_address: str, hub_name: str) -> None:
    a = store_for(pg_address, hub_name, lease_ttl=0.3)
    b = store_for(pg_address, hub_name)
    await a.store.open()
    await b.store.open()
    try:
        await a.store.apply(create(new_state()))
        item = await lease_one(a.store)
        assert item is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(a.store.run)
            await nursery.start(b.store.run)
            await trio.sleep(1.5)  # five times the lease's time to live, and b's poll has run
            assert await lease_one(b.store, YOU) is None
            nursery.cancel_scope.cancel()
        await a.store.apply(step(item))
    finally:
        await a.store.close()
        await b.store.close()


async def test_opening_a_store_keeps_the_other_sidecars_leases_and_closing_gives_its_own_back(
    pg_address: str, hub_name: str
) -> None:
    a = PostgresBackend(pg_address, hub_name)
    await a.open()
    await a.apply(create(new_state()))
    item = await lease_one(a)
    assert item is not None
    b = PostgresBackend(pg_address, hub_name)
    await b.open()
    try:
        assert await lease_one(b, YOU) is None
        await a.close()
        taken = await lease_one(b, YOU)
        assert taken is not None and taken.lease.epoch == item.lease.epoch + 1
    finally:
        await a.close()
        await b.close()


async def test_a_commit_on_one_sidecar_wakes_the_others_processors_and_waiters(
    two: tuple[Hub, Hub],
) -> None:
    a, b = two
    await trio.testing.wait_all_tasks_blocked()
    b.signals.orchestration_work.clear()
    b.signals.activity_work.clear()
    change = b.signals.instance_event("i1")
    with trio.fail_after(5):
        await a.store.apply(create(new_state()))
        await b.signals.orchestration_work.wait()
        await change.wait()
    item = await lease_one(a.store)
    assert item is not None
    task = scheduled(1)
    await a.store.apply(step(item, history=[task], activities=[ActivityTask("i1", "e0", task)]))
    with trio.fail_after(5):
        await b.signals.activity_work.wait()
    [activity] = await b.store.lease_activities(YOU, now(), 5)
    assert activity.instance_id == "i1"


async def test_a_lone_sidecar_sends_no_wake_ups_until_another_listens(
    pg_address: str, hub_name: str
) -> None:
    def heard(conn: psycopg.Connection[Any]) -> list[str]:
        conn.execute("SELECT 1")  # takes in what arrived
        return [n.payload for n in conn.notifies(timeout=0.2)]

    a = store_for(pg_address, hub_name)
    b = store_for(pg_address, hub_name)
    with psycopg.connect(pg_address, autocommit=True) as spy:  # not a sidecar: not a peer
        spy.execute(f'LISTEN "dt_trio_{hub_name}"')
        await a.store.open()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(a.store.run)
                await a.store.apply(create(new_state("alone")))
                await trio.sleep(0.05)
                assert await trio.to_thread.run_sync(heard, spy) == []
                await b.store.open()
                await nursery.start(b.store.run)
                change = b.signals.instance_event("together")
                with trio.fail_after(5):  # b greets a as it starts listening
                    while not a.store._peers:  # noqa: ASYNC110 (a flag of the store, no event)
                        await trio.sleep(0.01)
                    await a.store.apply(create(new_state("together")))
                    await change.wait()
                said = await trio.to_thread.run_sync(heard, spy)
                assert any("together" in payload for payload in said), said
                nursery.cancel_scope.cancel()
        finally:
            await a.store.close()
            await b.store.close()


async def test_a_killed_listen_connection_loses_no_wake_up(
    two: tuple[Hub, Hub], pg_address: str, hub_name: str
) -> None:
    a, b = two
    with psycopg.connect(pg_address, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (f"dt-trio listening dt_trio_{hub_name}"[:63],),
        ).fetchall()
    assert len(killed) == 2  # both sidecars' listeners
    b.signals.orchestration_work.clear()
    change = b.signals.instance_event("i1")
    await a.store.apply(create(new_state()))
    with trio.fail_after(10):
        await b.signals.orchestration_work.wait()
        await change.wait()
    assert await lease_one(b.store, YOU) is not None


async def test_a_postgres_restart_is_unavailable_while_it_lasts_and_then_work_resumes() -> None:
    with _postgres.cluster() as server:
        hub = _postgres.new_hub()
        a = store_for(server.address, hub)
        b = store_for(server.address, hub)
        await a.store.open()
        await b.store.open()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(a.store.run)
                await nursery.start(b.store.run)
                await a.store.apply(create(new_state("before")))
                await trio.to_thread.run_sync(server.kill)
                with pytest.raises(StoreUnavailable):
                    await a.store.apply(create(new_state("during")))
                await trio.to_thread.run_sync(server.start)
                await a.store.apply(create(new_state("after")))
                assert await b.store.get_instance("before") is not None
                assert await b.store.get_instance("during") is None
                # b listens again (and was woken when it did): a's commits wake it
                change = b.signals.instance_event("late")
                await a.store.apply(create(new_state("late")))
                with trio.fail_after(10):
                    await change.wait()
                leased = await b.store.lease_orchestrations(YOU, now(), 10)
                assert {w.state.instance_id for w in leased} == {"before", "after", "late"}
                nursery.cancel_scope.cancel()
        finally:
            await a.store.close()
            await b.store.close()


async def test_lone_statements_run_on_a_connection_of_the_loop_made_again_when_lost(
    pg_address: str, hub_name: str
) -> None:
    def loop_backend() -> tuple[int, str] | None:
        with psycopg.connect(pg_address, autocommit=True) as conn:
            row = conn.execute(
                "SELECT pid, query FROM pg_stat_activity WHERE application_name = 'dt-trio loop' "
                "AND datname = current_database()"
            ).fetchone()
        return None if row is None else (row[0], row[1])

    a = store_for(pg_address, hub_name)
    await a.store.open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.store.run)
            with trio.fail_after(5):
                while await trio.to_thread.run_sync(loop_backend) is None:  # noqa: ASYNC110 (the server)
                    await trio.sleep(0.01)
            await a.store.apply(create(new_state("one")))
            found = await trio.to_thread.run_sync(loop_backend)
            assert found is not None and found[1].startswith("SELECT * FROM start(")
            with pytest.raises(InstanceExists):  # the function's answer, read on that connection
                await a.store.apply(create(new_state("one")))
            with pytest.raises(InvalidRequest):  # psycopg refuses it before it is sent
                await a.store.apply(create(new_state("bad", input="nul \x00")))
            state = await a.store.get_instance("one")
            assert state is not None and state.instance_id == "one"
            found = await trio.to_thread.run_sync(loop_backend)
            assert found is not None and "FROM instances" in found[1]
            killed_pid = found[0]
            with psycopg.connect(pg_address, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (killed_pid,))
            await trio.sleep(0.05)  # (its goodbye reaches the socket)
            # the dead connection is noticed before use: a worker thread's connection instead
            await a.store.apply(create(new_state("two")))
            assert await a.store.get_instance("two") is not None
            with trio.fail_after(10):  # and a new one is made
                while True:
                    found = await trio.to_thread.run_sync(loop_backend)
                    if found is not None and found[0] != killed_pid:
                        break
                    await trio.sleep(0.05)
            async with trio.open_nursery() as starts:  # one on the loop's, the others not
                for i in range(5):
                    starts.start_soon(a.store.apply, create(new_state(f"many{i}")))
            for i in range(5):
                assert await a.store.get_instance(f"many{i}") is not None
            nursery.cancel_scope.cancel()
    finally:
        await a.store.close()


async def test_the_writers_connections_killed_fail_no_commit_and_are_made_again(
    pg_address: str, hub_name: str
) -> None:
    def writers() -> list[int]:
        with psycopg.connect(pg_address, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'dt-trio writer' "
                "AND datname = current_database()"
            ).fetchall()
        return [r[0] for r in rows]

    a = store_for(pg_address, hub_name)
    await a.store.open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.store.run)
            items = await leased(a.store, "w1", "w2", "w3", "w4")
            await a.store.apply(step(items[0]))
            pipelines = a.store.counts.pipelines
            assert pipelines >= 1  # on a writer's connection
            killed = await trio.to_thread.run_sync(writers)
            assert len(killed) == WRITERS
            with psycopg.connect(pg_address, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", (killed,)
                )
            await trio.sleep(0.05)  # (their goodbyes reach the sockets)
            await a.store.apply(step(items[1]))  # found closed: written in a worker thread
            with trio.fail_after(10):  # and new ones are made
                while not set(await trio.to_thread.run_sync(writers)) - set(killed):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            await a.store.apply(step(items[2]))
            await a.store.apply(step(items[3]))
            assert a.store.counts.pipelines > pipelines  # on the new ones
            for item in items:
                assert len(await a.store.get_history(item.state.instance_id)) == 2
            nursery.cancel_scope.cancel()
    finally:
        await a.store.close()


async def test_commits_beyond_a_batchs_limit_go_in_the_next_batches(
    pg_address: str, hub_name: str
) -> None:
    a = store_for(pg_address, hub_name)
    await a.store.open()
    try:
        ids = [f"b{i}" for i in range(BATCH_LIMIT + 10)]
        items = await leased(a.store, *ids)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.store.run)
            pipelines = a.store.counts.pipelines
            async with trio.open_nursery() as steps:
                for item in items:
                    steps.start_soon(a.store.apply, step(item))
            assert a.store.counts.pipelines >= pipelines + 2
            nursery.cancel_scope.cancel()
        for i in ids:
            assert len(await a.store.get_history(i)) == 2
    finally:
        await a.store.close()


async def test_killed_pool_connections_are_replaced_without_an_error(
    store: PostgresBackend, pg_address: str, hub_name: str
) -> None:
    await store.apply(create(new_state()))
    with psycopg.connect(pg_address, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'dt-trio' AND pid <> pg_backend_pid()"
        ).fetchall()
    assert killed
    for i in range(4):  # more than the pool had open: every dead one is met and replaced
        await store.apply(create(new_state(f"after{i}")))
    assert await store.get_instance("after3") is not None


async def test_a_deadlock_is_retried(
    store: PostgresBackend, pg_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "dt_trio._store._postgres._store")
    await store.apply(create(new_state("x")))
    await store.apply(create(new_state("y")))
    item = await lease_one(store)
    assert item is not None and item.state.instance_id == "x"
    # Another program holds y, then wants x, while the commit holds x and wants y.
    blocker = psycopg.connect(pg_address)
    try:
        blocker.execute("SET deadlock_timeout = '10s'")  # the commit's side detects it
        blocker.execute(
            f"SELECT 1 FROM {store.schema}.instances WHERE instance_id = 'y' FOR UPDATE"
        )
        message = OutboundMessage("y", ev.event_raised(now(), "e", None))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.apply, step(item, messages=[message]))
            with trio.fail_after(10):
                while True:  # until the commit waits for y's lock
                    waiting = blocker.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dt-trio' "
                        "AND wait_event_type = 'Lock'"
                    ).fetchone()
                    if waiting and waiting[0]:
                        break
                    await trio.sleep(0.01)

            def take_x_then_finish() -> None:
                blocker.execute(
                    f"SELECT 1 FROM {store.schema}.instances WHERE instance_id = 'x' FOR UPDATE"
                )
                blocker.rollback()

            await trio.to_thread.run_sync(take_x_then_finish)
    finally:
        blocker.close()
    assert "retrying a transaction: deadlock detected" in caplog.text
    assert len(await store.get_history("x")) == 2  # committed on its retry
    y = await lease_one(store)
    assert y is not None and [ev.kind(m.event) for m in y.inbox][-1] == "eventRaised"


async def test_data_postgres_cannot_hold_is_an_invalid_request(store: PostgresBackend) -> None:
    import random
    import string

    from dt_trio._errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="cannot contain NUL"):
        await store.apply(create(new_state("a\x00b")))
    huge = "".join(random.choices(string.ascii_letters, k=10_000))  # beyond an index entry
    with pytest.raises(InvalidRequest, match="PostgreSQL cannot store"):
        await store.apply(create(new_state(huge)))
    await store.apply(create(new_state()))
    assert await store.get_instance("i1") is not None
