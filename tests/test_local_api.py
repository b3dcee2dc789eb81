"""The local Python API: orchestrations written in Python, run in the hub's own process."""

from __future__ import annotations

import itertools
import json
import pathlib
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
from _harness import a_store, cache_problems

import dt_trio
from dt_trio import Status

registry = dt_trio.Registry()
calls: dict[str, int] = {}
calls_lock = threading.Lock()


def count(key: str) -> int:
    with calls_lock:
        calls[key] = calls.get(key, 0) + 1
        return calls[key]


@registry.activity
async def greet(ctx: dt_trio.ActivityContext, city: str) -> str:
    await trio.lowlevel.checkpoint()
    return f"Hello, {city}!"


@registry.activity
def double(ctx: dt_trio.ActivityContext, n: int) -> int:  # a plain function: a worker thread
    return n * 2


@registry.activity
def flaky(ctx: dt_trio.ActivityContext, key: str) -> int:
    attempt = count(key)
    if attempt < 3:
        raise ConnectionError(f"attempt {attempt} fails")
    return attempt


@registry.activity
def explode(ctx: dt_trio.ActivityContext, message: str) -> None:
    raise ValueError(message)


@registry.orchestrator
def hello_cities(ctx: dt_trio.OrchestrationContext, _: Any) -> Any:
    out = []
    for city in ("Tokyo", "Seattle", "London"):
        out.append((yield ctx.call_activity(greet, input=city)))
    return out


@registry.orchestrator
def fan_out(ctx: dt_trio.OrchestrationContext, n: int) -> Any:
    return sum((yield dt_trio.when_all([ctx.call_activity(double, input=i) for i in range(n)])))


@registry.orchestrator
def sleeper(ctx: dt_trio.OrchestrationContext, seconds: float) -> Any:
    start = ctx.current_utc_datetime
    yield ctx.create_timer(timedelta(seconds=seconds))
    return (ctx.current_utc_datetime - start).total_seconds()


@registry.orchestrator
def child(ctx: dt_trio.OrchestrationContext, n: int) -> Any:
    if n < 0:
        raise ValueError("negative input")
    return (yield ctx.call_activity(double, input=n)) + 1


@registry.orchestrator
def parent(ctx: dt_trio.OrchestrationContext, n: int) -> Any:
    return (yield ctx.call_sub_orchestrator(child, input=n, instance_id=f"{ctx.instance_id}-kid"))


@registry.orchestrator
def approval(ctx: dt_trio.OrchestrationContext, timeout: float) -> Any:
    ctx.set_custom_status("waiting for approval")
    decision = ctx.wait_for_external_event("Approval")
    timer = ctx.create_timer(timedelta(seconds=timeout))
    winner = yield dt_trio.when_any([decision, timer])
    ctx.set_custom_status("decided")
    return decision.get_result() if winner is decision else "timed out"


@registry.orchestrator
def retrying(ctx: dt_trio.OrchestrationContext, key: str) -> Any:
    policy = dt_trio.RetryPolicy(
        first_retry_interval=timedelta(milliseconds=50), max_number_of_attempts=5
    )
    return (yield ctx.call_activity(flaky, input=key, retry_policy=policy))


@registry.orchestrator
def catching(ctx: dt_trio.OrchestrationContext, _: Any) -> Any:
    try:
        yield ctx.call_activity(explode, input="kaboom")
    except dt_trio.TaskFailedError as exc:
        return {"type": exc.error_type, "message": exc.message}
    return "not caught"


@registry.orchestrator
def failing(ctx: dt_trio.OrchestrationContext, _: Any) -> Any:
    yield ctx.call_activity(explode, input="unhandled")


@registry.orchestrator
def counter(ctx: dt_trio.OrchestrationContext, n: int) -> Any:
    if n < 5:
        ctx.continue_as_new(n + 1)
        return None
    return n


@registry.orchestrator
def waiter(ctx: dt_trio.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.wait_for_external_event("go"))


@registry.orchestrator
def sender(ctx: dt_trio.OrchestrationContext, target: str) -> Any:
    ctx.send_event(target, "go", "from a friend")
    return "sent"


@pytest.fixture
async def client(tmp_path: pathlib.Path) -> AsyncIterator[dt_trio.Client]:
    async with dt_trio.open_task_hub(**a_store(tmp_path).kwargs(), registry=registry) as c:
        yield c
        # Every test here doubles as a check of the store's instance cache.
        assert await cache_problems(c._hub.store) == []


async def run(client: dt_trio.Client, orchestrator: Any, input: Any = None) -> Any:
    instance_id = await client.schedule(orchestrator, input)
    with trio.fail_after(30):
        return await client.wait_for_completion(instance_id)


async def test_activities_run_in_sequence(client: dt_trio.Client) -> None:
    state = await run(client, hello_cities)
    assert state.status == Status.COMPLETED
    assert state.output == ["Hello, Tokyo!", "Hello, Seattle!", "Hello, London!"]
    assert state.name == "hello_cities"


async def test_fan_out_and_in_over_thread_activities(client: dt_trio.Client) -> None:
    state = await run(client, fan_out, 20)
    assert state.output == sum(i * 2 for i in range(20))


async def test_a_durable_timer_waits_its_time(client: dt_trio.Client) -> None:
    state = await run(client, sleeper, 0.3)
    assert state.status == Status.COMPLETED and state.output >= 0.3


async def test_sub_orchestrations_return_results_and_failures(client: dt_trio.Client) -> None:
    assert (await run(client, parent, 4)).output == 9
    failed = await run(client, parent, -1)
    assert failed.status == Status.FAILED
    assert failed.failure is not None and "negative input" in failed.failure.message


async def test_an_external_event_wins_over_the_timeout(client: dt_trio.Client) -> None:
    instance_id = await client.schedule(approval, 30)
    with trio.fail_after(10):
        started = await client.wait_for_start(instance_id)
    # the first step committed with the instance's start: the event now has a waiter
    assert started.status == Status.RUNNING
    assert started.custom_status == "waiting for approval"
    await client.raise_event(instance_id, "approval", {"by": "ana"})
    with trio.fail_after(10):
        state = await client.wait_for_completion(instance_id)
    assert state.output == {"by": "ana"} and state.custom_status == "decided"


async def test_the_timeout_wins_when_no_event_comes(client: dt_trio.Client) -> None:
    assert (await run(client, approval, 0.2)).output == "timed out"


async def test_a_retry_policy_retries_until_success(client: dt_trio.Client) -> None:
    key = f"retry-{id(client)}"
    state = await run(client, retrying, key)
    assert state.status == Status.COMPLETED and state.output == 3


async def test_failures_can_be_caught_or_fail_the_orchestration(client: dt_trio.Client) -> None:
    caught = await run(client, catching)
    assert caught.output == {"type": "builtins.ValueError", "message": "kaboom"}
    failed = await run(client, failing)
    assert failed.status == Status.FAILED
    assert failed.failure is not None and failed.failure.error_type == "builtins.ValueError"


async def test_continue_as_new_restarts_with_the_new_input(client: dt_trio.Client) -> None:
    state = await run(client, counter, 0)
    assert state.status == Status.COMPLETED and state.output == 5


async def test_events_between_orchestrations(client: dt_trio.Client) -> None:
    target = await client.schedule(waiter, instance_id="local-waiter")
    await run(client, sender, target)
    with trio.fail_after(10):
        assert (await client.wait_for_completion(target)).output == "from a friend"


async def test_suspend_buffers_events_until_resume(client: dt_trio.Client) -> None:
    instance_id = await client.schedule(waiter)
    with trio.fail_after(10):
        await client.wait_for_start(instance_id)
    await client.suspend(instance_id)
    await client.raise_event(instance_id, "go", "later")
    with trio.fail_after(10):
        suspended = await client.wait_until(instance_id, lambda s: s.status == Status.SUSPENDED)
    assert suspended.status == Status.SUSPENDED
    await client.resume(instance_id)
    with trio.fail_after(10):
        assert (await client.wait_for_completion(instance_id)).output == "later"


async def test_terminate_purge_and_query(client: dt_trio.Client) -> None:
    instance_id = await client.schedule(waiter, instance_id="local-doomed")
    with trio.fail_after(10):
        await client.wait_for_start(instance_id)
    await client.terminate(instance_id, "enough")
    with trio.fail_after(10):
        state = await client.wait_for_completion(instance_id)
    assert state.status == Status.TERMINATED and state.output == "enough"
    found = [s.instance_id async for s in client.query(id_prefix="local-", page_size=1)]
    assert "local-doomed" in found
    assert await client.purge(instance_id) == 1
    assert await client.get(instance_id) is None
    with pytest.raises(dt_trio.InstanceNotFound):
        await client.terminate("nobody", None)


async def test_scheduling_an_orchestrator_the_hub_does_not_have_is_refused(
    client: dt_trio.Client,
) -> None:
    """A hub without gRPC runs only what its registry has: anything else would stay
    pending forever."""

    def unregistered(ctx: dt_trio.OrchestrationContext, _: Any) -> Any:
        return None
        yield

    for orchestrator in ("nonexistent", unregistered):
        with pytest.raises(dt_trio.InvalidRequest, match=r"no orchestrator named '\w+' is"):
            await client.schedule(orchestrator, instance_id="never")
        assert await client.get("never") is None
    assert (await run(client, "hello_cities")).status == Status.COMPLETED


async def test_a_start_can_be_scheduled_for_later(client: dt_trio.Client) -> None:
    at = datetime.now(UTC) + timedelta(seconds=0.3)
    instance_id = await client.schedule(hello_cities, start_at=at)
    assert (await client.get(instance_id)).status == Status.PENDING  # type: ignore[union-attr]
    with trio.fail_after(10):
        state = await client.wait_for_completion(instance_id)
    assert state.status == Status.COMPLETED and state.last_updated_at >= at


async def test_a_changed_orchestrator_fails_with_a_non_determinism_error(
    tmp_path: pathlib.Path,
) -> None:
    deployed = ["ship first"]
    changing = dt_trio.Registry()

    @changing.activity
    async def ship(ctx: dt_trio.ActivityContext, _: Any) -> str:
        return "shipped"

    @changing.activity
    async def bill(ctx: dt_trio.ActivityContext, _: Any) -> str:
        return "billed"

    @changing.orchestrator
    def evolving(ctx: dt_trio.OrchestrationContext, _: Any) -> Any:
        first = ship if deployed[0] == "ship first" else bill
        yield ctx.call_activity(first)
        ctx.set_custom_status("waiting")
        yield ctx.wait_for_external_event("go")
        return "done"

    store = a_store(tmp_path).kwargs()
    async with dt_trio.open_task_hub(**store, registry=changing) as c:
        instance_id = await c.schedule(evolving)
        with trio.fail_after(10):
            await c.wait_until(instance_id, lambda s: s.custom_status == "waiting")
    # A new deployment bills first: the event replays the code, which now differs.
    deployed[0] = "bill first"
    async with dt_trio.open_task_hub(**store, registry=changing) as c:
        await c.raise_event(instance_id, "go")
        with trio.fail_after(10):
            state = await c.wait_for_completion(instance_id)
    assert state.status == Status.FAILED
    assert state.failure is not None
    assert state.failure.error_type.endswith("NonDeterminismError")
    assert "same order on every replay" in state.failure.message


RESTART = textwrap.dedent(
    """
    import json, pathlib, sys, time
    import trio, dt_trio

    store, phase, marker = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    registry = dt_trio.Registry()

    @registry.activity
    def slow(ctx, n):
        if phase == "first":
            pathlib.Path(marker).write_text("running")
            time.sleep(600)  # killed here
        return n * 10

    @registry.activity
    def quick(ctx, n):
        return n + 1

    @registry.orchestrator
    def journey(ctx, n):
        a = yield ctx.call_activity(quick, input=n)
        b = yield ctx.call_activity(slow, input=a)
        return [a, b]

    async def main():
        async with dt_trio.open_task_hub(**store, registry=registry) as client:
            if phase == "first":
                await client.schedule(journey, 1, instance_id="journey")
                await trio.sleep_forever()
            state = await client.wait_for_completion("journey")
            print(state.status.name, state.output)

    trio.run(main)
    """
)


def test_a_new_process_finishes_what_a_killed_one_started(tmp_path: pathlib.Path) -> None:
    db, marker = json.dumps(a_store(tmp_path).kwargs()), tmp_path / "marker"
    first = subprocess.Popen([sys.executable, "-c", RESTART, db, "first", str(marker)])
    try:
        for _ in range(1000):
            if marker.exists() or first.poll() is not None:
                break
            threading.Event().wait(0.02)
        assert marker.exists(), "the first process never reached the slow activity"
    finally:
        first.kill()
        first.wait(10)
    second = subprocess.run(
        [sys.executable, "-c", RESTART, db, "second", str(marker)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "COMPLETED [2, 20]"


def remote_triple(ctx: Any, n: int) -> int:  # an SDK activity, run by an SDK worker
    return n * 3


@registry.orchestrator
def mixed(ctx: dt_trio.OrchestrationContext, n: int) -> Any:
    local = yield ctx.call_activity(double, input=n)  # this process
    remote = yield ctx.call_activity("remote_triple", input=n)  # the SDK worker
    return [local, remote]


async def test_one_hub_serves_local_code_and_remote_sdk_workers(tmp_path: pathlib.Path) -> None:
    from _harness import sdk_client, sdk_worker
    from durabletask import task

    def sdk_orchestration(ctx: task.OrchestrationContext, n: int) -> Any:
        return (yield ctx.call_activity(remote_triple, input=n)) + 1

    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            lambda task_status: dt_trio.serve(
                host="127.0.0.1",
                port=0,
                **a_store(tmp_path).kwargs(),
                registry=registry,
                task_status=task_status,
            )
        )
        address = f"{host}:{port}"

        def drive() -> tuple[Any, Any]:
            with sdk_worker(address, [sdk_orchestration], [remote_triple]):
                c = sdk_client(address)
                local_id = c.schedule_new_orchestration("mixed", input=5)
                remote_id = c.schedule_new_orchestration(sdk_orchestration, input=5)
                local = c.wait_for_orchestration_completion(local_id, timeout=30)
                remote = c.wait_for_orchestration_completion(remote_id, timeout=30)
                return local, remote

        local, remote = await trio.to_thread.run_sync(drive)
        nursery.cancel_scope.cancel()
    assert local is not None and local.serialized_output == "[10, 15]"
    assert remote is not None and remote.serialized_output == "16"


@pytest.mark.store_independent
@pytest.mark.parametrize(
    ("example", "expected"),
    [
        (
            "local_hello_cities.py",
            "COMPLETED ['Hello, Tokyo!', 'Hello, Seattle!', 'Hello, London!']",
        ),
        ("local_fan_out.py", "COMPLETED 328350"),
        ("local_approval.py", "COMPLETED approved by Ana\nCOMPLETED escalated"),
    ],
)
def test_the_local_examples_run(tmp_path: pathlib.Path, example: str, expected: str) -> None:
    script = pathlib.Path(__file__).resolve().parent.parent / "examples" / example
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "example.sqlite3")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if not line.startswith("  ")]
    assert "\n".join(lines) == expected


# -- entities ------------------------------------------------------------------------------------


async def poll_until(read: Any, key: str, done: Any) -> Any:
    """Entities have no wait rpc: read until `done` holds for a non-None value."""
    with trio.fail_after(10):
        for _ in itertools.count():
            value = await read(key)
            if value is not None and done(value):
                return value
            await trio.sleep(0.01)


@registry.entity
def tally(ctx: dt_trio.EntityContext, value: Any) -> Any:
    current = ctx.get_state(0)
    if ctx.operation == "add":
        ctx.set_state(current + value)
    elif ctx.operation == "set":
        ctx.set_state(value)
    elif ctx.operation == "fail":
        ctx.set_state(current + 1000)
        raise ValueError("tally refuses")
    elif ctx.operation == "forward":
        ctx.signal_entity(dt_trio.entity_id("tally", value), "add", current)
    elif ctx.operation == "start":
        return ctx.schedule_new_orchestration("hello_cities", instance_id=value)
    return current


@registry.orchestrator
def use_tally(ctx: dt_trio.OrchestrationContext, key: str) -> Any:
    target = dt_trio.entity_id("tally", key)
    ctx.signal_entity(target, "add", 2)
    before = yield ctx.call_entity(target, "get")
    try:
        yield ctx.call_entity(target, "fail")
    except dt_trio.TaskFailedError as exc:
        failure = exc.message
    with (yield ctx.lock_entities([target])):
        value = yield ctx.call_entity(target, "get")
        yield ctx.wait_for_external_event("go")
        yield ctx.call_entity(target, "set", value + 1)
    return {"before": before, "failure": failure, "after": (yield ctx.call_entity(target, "get"))}


async def test_entities_from_the_client_and_from_orchestrations(client: dt_trio.Client) -> None:
    target = dt_trio.entity_id("Tally", "k1")
    assert target == "@tally@k1"
    await client.signal_entity(target, "set", 40)
    instance_id = await client.schedule(use_tally, "k1")
    entity = await poll_until(client.get_entity, target, lambda e: e.locked_by == instance_id)
    assert entity.state == 42  # locked: the section read it, and waits for "go"
    await client.signal_entity(target, "add", 100)  # waits behind the lock
    await client.raise_event(instance_id, "go")
    with trio.fail_after(10):
        state = await client.wait_for_completion(instance_id)
    # set(42 + 1) inside the section; the +100 ran once the section released the lock, before
    # the last call; the +1000 of the failed operation was rolled back.
    assert state.output == {"before": 42, "failure": "tally refuses", "after": 143}
    entity = await poll_until(client.get_entity, target, lambda e: e.backlog == 0)
    assert entity.state == 143 and entity.locked_by is None


async def test_entities_signal_entities_and_start_orchestrations(client: dt_trio.Client) -> None:
    await client.signal_entity(dt_trio.entity_id("tally", "src"), "set", 7)
    await client.signal_entity(dt_trio.entity_id("tally", "src"), "forward", "dst")
    await client.signal_entity(dt_trio.entity_id("tally", "src"), "start", "from-an-entity")
    entity = await poll_until(client.get_entity, dt_trio.entity_id("tally", "dst"), bool)
    await poll_until(client.get, "from-an-entity", bool)
    with trio.fail_after(10):
        started = await client.wait_for_completion("from-an-entity")
    assert entity.state == 7
    assert started.output == ["Hello, Tokyo!", "Hello, Seattle!", "Hello, London!"]


async def test_closing_the_hub_cancels_async_activities_and_a_new_hub_runs_them_again(
    tmp_path: pathlib.Path,
) -> None:
    store = a_store(tmp_path).kwargs()
    entered = trio.Event()
    cancelled: list[bool] = []
    first = dt_trio.Registry()
    second = dt_trio.Registry()

    @first.activity
    async def long_job(ctx: dt_trio.ActivityContext, _: Any) -> str:
        entered.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(True)
            raise
        return "never"

    @second.activity
    async def long_job_again(ctx: dt_trio.ActivityContext, _: Any) -> str:
        return "finished by the second hub"

    def waits(ctx: dt_trio.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity("long_job"))

    first.add_orchestrator(waits)
    second.add_orchestrator(waits)
    second.add_activity(long_job_again, name="long_job")
    async with dt_trio.open_task_hub(**store, registry=first) as c:
        await c.schedule(waits, instance_id="job")
        with trio.fail_after(10):
            await entered.wait()
    assert cancelled == [True]  # cancelled with the hub's nursery, not left running
    async with dt_trio.open_task_hub(**store, registry=second) as c:
        with trio.fail_after(10):
            state = await c.wait_for_completion("job")
    assert state.output == "finished by the second hub"


@pytest.mark.store_independent
async def test_the_activities_of_a_finished_orchestration_never_run_again(
    tmp_path: pathlib.Path,
) -> None:
    """A terminated orchestration's activity, cancelled with its hub, ran again at every
    open of the store, until the instance was purged. (One its last step schedules runs,
    once, as the SDKs' servers run it.)"""
    db = str(tmp_path / "finished.sqlite3")
    runs: list[str] = []
    entered = trio.Event()
    hub_registry = dt_trio.Registry()

    @hub_registry.activity
    async def endless(ctx: dt_trio.ActivityContext, who: str) -> str:
        runs.append(who)
        if who == "doomed":
            entered.set()
            await trio.sleep_forever()
        return who

    @hub_registry.orchestrator
    def calls(ctx: dt_trio.OrchestrationContext, who: str) -> Any:
        return (yield ctx.call_activity(endless, input=who))

    @hub_registry.orchestrator
    def fire_and_forget(ctx: dt_trio.OrchestrationContext, who: str) -> Any:
        ctx.call_activity(endless, input=who)  # never awaited: the orchestration ends first
        return "done"

    async with dt_trio.open_task_hub(db, registry=hub_registry) as c:
        await c.schedule(calls, "doomed", instance_id="doomed")
        with trio.fail_after(10):
            await entered.wait()
        await c.terminate("doomed", "enough")
        await run(c, fire_and_forget, "forgotten")
        with trio.fail_after(10):
            assert (await c.wait_for_completion("doomed")).status == Status.TERMINATED
    for life in range(2):
        async with dt_trio.open_task_hub(db, registry=hub_registry) as c:
            # an activity scheduled now runs after any left from before
            assert (await run(c, calls, f"life {life}")).output == f"life {life}"
    assert runs == ["doomed", "forgotten", "life 0", "life 1"]


@pytest.mark.store_independent
async def test_running_hubs_space_out_young_collections_and_restore_the_thresholds(
    tmp_path: pathlib.Path,
) -> None:
    import gc

    from dt_trio._hub import GC_YOUNG_THRESHOLD

    before = gc.get_threshold()
    gc.set_threshold(700, *before[1:])
    assert gc.get_freeze_count() == 0
    try:
        registry = dt_trio.Registry()
        async with dt_trio.open_task_hub(str(tmp_path / "a.sqlite3"), registry=registry):
            assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
            # what the process held before the hub started is out of the collector's sight
            assert gc.get_freeze_count() > 0
            async with dt_trio.open_task_hub(str(tmp_path / "b.sqlite3"), registry=registry):
                assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
            assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD  # one hub still runs
            assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (700, *before[1:])
        assert gc.get_freeze_count() == 0  # collectable again
        # an application's own, higher threshold is left alone, and so is its own freeze
        gc.set_threshold(GC_YOUNG_THRESHOLD * 2, *before[1:])
        gc.freeze()
        async with dt_trio.open_task_hub(str(tmp_path / "c.sqlite3"), registry=registry):
            assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD * 2
        assert gc.get_freeze_count() > 0  # still the application's
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
