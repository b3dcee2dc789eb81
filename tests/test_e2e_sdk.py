"""End to end: the official Durable Task Python SDK runs orchestrations on a dt-trio sidecar.

One sidecar (sqlite file) and one SDK worker serve the whole module; every test uses its own
instance ids, so tests stay independent.
"""

from __future__ import annotations

import json
import pathlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from _harness import Sidecar, running_sidecar, sdk_client, sdk_worker, wait_until
from durabletask import client, history, task

OrchestrationStatus = client.OrchestrationStatus
attempts: Counter[str] = Counter()
attempts_lock = threading.Lock()


# -- activities ------------------------------------------------------------------------------


def say_hello(ctx: task.ActivityContext, city: str) -> str:
    return f"Hello, {city}!"


def double(ctx: task.ActivityContext, n: int) -> int:
    return n * 2


def explode(ctx: task.ActivityContext, message: str) -> None:
    raise ValueError(message)


def flaky(ctx: task.ActivityContext, key: str) -> int:
    with attempts_lock:
        attempts[key] += 1
        count = attempts[key]
    if count < 3:
        raise RuntimeError(f"attempt {count} fails")
    return count


# -- orchestrators ---------------------------------------------------------------------------


def hello_cities(ctx: task.OrchestrationContext, _: Any) -> Any:
    out = []
    for city in ("Tokyo", "Seattle", "London"):
        out.append((yield ctx.call_activity(say_hello, input=city)))
    return out


def fan_out(ctx: task.OrchestrationContext, n: int) -> Any:
    results = yield task.when_all([ctx.call_activity(double, input=i) for i in range(n)])
    return sum(results)


def sleeper(ctx: task.OrchestrationContext, seconds: float) -> Any:
    yield ctx.create_timer(timedelta(seconds=seconds))
    return "woke"


def child(ctx: task.OrchestrationContext, n: int) -> Any:
    if n < 0:
        raise ValueError("negative input")
    return (yield ctx.call_activity(double, input=n)) + 1


def parent(ctx: task.OrchestrationContext, n: int) -> Any:
    return (yield ctx.call_sub_orchestrator(child, input=n, instance_id=f"{ctx.instance_id}-kid"))


def approval(ctx: task.OrchestrationContext, timeout: float) -> Any:
    decision = ctx.wait_for_external_event("approval")
    timer = ctx.create_timer(timedelta(seconds=timeout))
    winner = yield task.when_any([decision, timer])
    return decision.get_result() if winner == decision else "timed out"


def waiter(ctx: task.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.wait_for_external_event("go"))


def sender(ctx: task.OrchestrationContext, target: str) -> Any:
    ctx.send_event(target, "go", data="from a friend")
    return "sent"


def counter(ctx: task.OrchestrationContext, n: int) -> Any:
    if n < 5:
        ctx.continue_as_new(n + 1)
        return None
    return n


def with_status(ctx: task.OrchestrationContext, _: Any) -> Any:
    ctx.set_custom_status({"stage": "waiting"})
    yield ctx.wait_for_external_event("go")
    ctx.set_custom_status({"stage": "done"})
    return "ok"


def failing(ctx: task.OrchestrationContext, _: Any) -> Any:
    yield ctx.call_activity(explode, input="kaboom")


def retrying(ctx: task.OrchestrationContext, key: str) -> Any:
    policy = task.RetryPolicy(
        first_retry_interval=timedelta(milliseconds=100), max_number_of_attempts=5
    )
    return (yield ctx.call_activity(flaky, input=key, retry_policy=policy))


def long_parent(ctx: task.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.call_sub_orchestrator(waiter, instance_id=f"{ctx.instance_id}-kid"))


ORCHESTRATORS: list[Callable[..., Any]] = [
    hello_cities,
    fan_out,
    sleeper,
    child,
    parent,
    approval,
    waiter,
    sender,
    counter,
    with_status,
    failing,
    retrying,
    long_parent,
]
ACTIVITIES: list[Callable[..., Any]] = [say_hello, double, explode, flaky]


@pytest.fixture(scope="module")
def hub(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Sidecar, client.TaskHubGrpcClient]]:
    tmp: pathlib.Path = tmp_path_factory.mktemp("e2e")
    with running_sidecar(tmp) as sidecar, sdk_worker(sidecar.address, ORCHESTRATORS, ACTIVITIES):
        yield sidecar, sdk_client(sidecar.address)


@pytest.fixture
def c(hub: tuple[Sidecar, client.TaskHubGrpcClient]) -> client.TaskHubGrpcClient:
    return hub[1]


def run(c: client.TaskHubGrpcClient, orchestrator: Any, input: Any = None, **kw: Any) -> Any:
    instance_id = c.schedule_new_orchestration(orchestrator, input=input, **kw)
    state = c.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None
    return state


def running(c: client.TaskHubGrpcClient, orchestrator: Any, input: Any = None) -> str:
    instance_id = c.schedule_new_orchestration(orchestrator, input=input)
    c.wait_for_orchestration_start(instance_id, timeout=10)
    return instance_id


# -- tests -----------------------------------------------------------------------------------


def test_hello_cities_runs_three_activities_in_sequence(c: client.TaskHubGrpcClient) -> None:
    state = run(c, hello_cities)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert json.loads(state.serialized_output) == [
        "Hello, Tokyo!",
        "Hello, Seattle!",
        "Hello, London!",
    ]


def test_fan_out_fan_in(c: client.TaskHubGrpcClient) -> None:
    state = run(c, fan_out, 50)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert json.loads(state.serialized_output) == sum(i * 2 for i in range(50))


def test_durable_timer_fires_after_its_delay(c: client.TaskHubGrpcClient) -> None:
    started = time.monotonic()
    state = run(c, sleeper, 1.0)
    assert time.monotonic() - started >= 1.0
    assert json.loads(state.serialized_output) == "woke"


def test_sub_orchestration_result_reaches_the_parent(c: client.TaskHubGrpcClient) -> None:
    state = run(c, parent, 20)
    assert json.loads(state.serialized_output) == 41
    kid = c.get_orchestration_state(f"{state.instance_id}-kid")
    assert kid is not None and kid.runtime_status == OrchestrationStatus.COMPLETED


def test_failing_sub_orchestration_fails_the_parent(c: client.TaskHubGrpcClient) -> None:
    state = run(c, parent, -1)
    assert state.runtime_status == OrchestrationStatus.FAILED
    assert state.failure_details is not None
    assert "negative input" in state.failure_details.message


def test_external_event_is_delivered(c: client.TaskHubGrpcClient) -> None:
    instance_id = running(c, approval, 30)
    c.raise_orchestration_event(instance_id, "approval", data="approved")
    state = c.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and json.loads(state.serialized_output) == "approved"


def test_waiting_for_an_event_times_out_with_a_timer(c: client.TaskHubGrpcClient) -> None:
    state = run(c, approval, 0.5)
    assert json.loads(state.serialized_output) == "timed out"


def test_events_sent_between_orchestrations(c: client.TaskHubGrpcClient) -> None:
    target = running(c, waiter)
    assert run(c, sender, target).runtime_status == OrchestrationStatus.COMPLETED
    state = c.wait_for_orchestration_completion(target, timeout=10)
    assert state is not None and json.loads(state.serialized_output) == "from a friend"


def test_continue_as_new_restarts_with_the_new_input(c: client.TaskHubGrpcClient) -> None:
    state = run(c, counter, 0)
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert json.loads(state.serialized_output) == 5
    assert json.loads(state.serialized_input) == 5


def test_custom_status_is_visible_while_running(c: client.TaskHubGrpcClient) -> None:
    instance_id = running(c, with_status)
    deadline = time.monotonic() + 10
    state = c.get_orchestration_state(instance_id)
    while state is not None and state.serialized_custom_status is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
        state = c.get_orchestration_state(instance_id)
    assert state is not None
    assert json.loads(state.serialized_custom_status) == {"stage": "waiting"}
    c.raise_orchestration_event(instance_id, "go")
    done = c.wait_for_orchestration_completion(instance_id, timeout=10)
    assert done is not None and json.loads(done.serialized_custom_status) == {"stage": "done"}
    # Without payloads the custom status is left out, as durabletask-go and .NET leave it out.
    bare = c.get_orchestration_state(instance_id, fetch_payloads=False)
    assert bare is not None and bare.serialized_custom_status is None


def test_activity_failure_fails_the_orchestration_with_details(c: client.TaskHubGrpcClient) -> None:
    state = run(c, failing)
    assert state.runtime_status == OrchestrationStatus.FAILED
    assert state.failure_details is not None
    assert "kaboom" in state.failure_details.message
    assert state.failure_details.error_type.endswith("TaskFailedError")
    # The failure is a payload too (so the .NET client documents it), left out unless asked.
    bare = c.get_orchestration_state(state.instance_id, fetch_payloads=False)
    assert bare is not None and bare.runtime_status == OrchestrationStatus.FAILED
    assert bare.failure_details is None
    (queried,) = c.get_all_orchestration_states(
        client.OrchestrationQuery(instance_id_prefix=state.instance_id)
    )
    assert queried.failure_details is None and queried.serialized_custom_status is None


def test_retry_policy_retries_a_flaky_activity(c: client.TaskHubGrpcClient) -> None:
    state = run(c, retrying, "retry-key")
    assert state.runtime_status == OrchestrationStatus.COMPLETED
    assert json.loads(state.serialized_output) == 3
    assert attempts["retry-key"] == 3


def test_terminate_a_running_instance(c: client.TaskHubGrpcClient) -> None:
    instance_id = running(c, waiter)
    c.terminate_orchestration(instance_id, output="stopped by test", recursive=False)
    state = c.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.runtime_status == OrchestrationStatus.TERMINATED
    assert json.loads(state.serialized_output) == "stopped by test"


def test_recursive_terminate_reaches_the_running_child(c: client.TaskHubGrpcClient) -> None:
    instance_id = running(c, long_parent)
    kid = f"{instance_id}-kid"
    c.wait_for_orchestration_start(kid, timeout=10)
    c.terminate_orchestration(instance_id, output="all of you", recursive=True)
    for which in (instance_id, kid):
        state = c.wait_for_orchestration_completion(which, timeout=10)
        assert state is not None and state.runtime_status == OrchestrationStatus.TERMINATED


def test_suspend_buffers_events_until_resume(c: client.TaskHubGrpcClient) -> None:
    instance_id = running(c, waiter)
    c.suspend_orchestration(instance_id)
    deadline = time.monotonic() + 10
    while c.get_orchestration_state(instance_id).runtime_status != OrchestrationStatus.SUSPENDED:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    c.raise_orchestration_event(instance_id, "go", data="while suspended")
    with pytest.raises(TimeoutError):
        c.wait_for_orchestration_completion(instance_id, timeout=0.5)
    assert c.get_orchestration_state(instance_id).runtime_status == OrchestrationStatus.SUSPENDED
    c.resume_orchestration(instance_id)
    state = c.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and json.loads(state.serialized_output) == "while suspended"


def wait_for_status(
    c: client.TaskHubGrpcClient, instance_id: str, status: OrchestrationStatus
) -> None:
    wait_until(
        lambda: c.get_orchestration_state(instance_id).runtime_status == status,
        what=f"{instance_id} {status.name}",
    )


def test_a_second_suspend_and_a_resume_of_a_running_instance_are_dropped(
    c: client.TaskHubGrpcClient,
) -> None:
    """The SDK's worker spun forever on a suspend of a suspended orchestration once resumed,
    and failed one that was resumed while running: the sidecar drops both, as the SDK's own
    server does."""
    instance_id = running(c, waiter)
    c.resume_orchestration(instance_id)  # not suspended: nothing to resume
    c.suspend_orchestration(instance_id)
    wait_for_status(c, instance_id, OrchestrationStatus.SUSPENDED)
    c.suspend_orchestration(instance_id)
    c.raise_orchestration_event(instance_id, "go", data="after all that")
    c.resume_orchestration(instance_id)
    c.resume_orchestration(instance_id)
    state = c.wait_for_orchestration_completion(instance_id, timeout=10)
    assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
    assert json.loads(state.serialized_output) == "after all that"
    events = c.get_orchestration_history(instance_id)
    assert sum(isinstance(e, history.ExecutionSuspendedEvent) for e in events) == 1
    assert sum(isinstance(e, history.ExecutionResumedEvent) for e in events) == 1


def test_suspend_resume_and_terminate_from_many_threads_leave_every_instance_sound(
    c: client.TaskHubGrpcClient,
) -> None:
    ids = [running(c, waiter) for _ in range(12)]
    doomed = set(ids[::3])

    def storm(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            instance_id = rng.choice(ids)
            if instance_id in doomed and rng.random() < 0.05:
                c.terminate_orchestration(instance_id, output="stormed")
            elif rng.random() < 0.5:
                c.suspend_orchestration(instance_id)
            else:
                c.resume_orchestration(instance_id)

    threads = [threading.Thread(target=storm, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for instance_id in ids:
        if instance_id in doomed:
            c.terminate_orchestration(instance_id, output="stormed")
        c.resume_orchestration(instance_id)
        c.raise_orchestration_event(instance_id, "go", data="calm")
    for instance_id in ids:
        state = c.wait_for_orchestration_completion(instance_id, timeout=20)
        assert state is not None
        expected = (
            (OrchestrationStatus.TERMINATED, "stormed")
            if instance_id in doomed
            else (OrchestrationStatus.COMPLETED, "calm")
        )
        assert (state.runtime_status, json.loads(state.serialized_output)) == expected
    # and the worker still serves
    assert json.loads(run(c, child, 20).serialized_output) == 41


def test_scheduled_start_keeps_the_instance_pending_until_then(c: client.TaskHubGrpcClient) -> None:
    start_at = datetime.now(UTC) + timedelta(seconds=1.5)
    instance_id = c.schedule_new_orchestration(hello_cities, start_at=start_at)
    state = c.get_orchestration_state(instance_id)
    assert state is not None and state.runtime_status == OrchestrationStatus.PENDING
    with pytest.raises(TimeoutError):
        c.wait_for_orchestration_start(instance_id, timeout=0.5)
    done = c.wait_for_orchestration_completion(instance_id, timeout=15)
    assert done is not None and done.runtime_status == OrchestrationStatus.COMPLETED
    assert datetime.now(UTC) >= start_at


def test_wait_for_completion_times_out_within_its_bound(c: client.TaskHubGrpcClient) -> None:
    instance_id = running(c, waiter)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        c.wait_for_orchestration_completion(instance_id, timeout=0.5)
    assert time.monotonic() - started < 5
    c.terminate_orchestration(instance_id)


def test_purge_removes_the_instance_and_its_children(c: client.TaskHubGrpcClient) -> None:
    state = run(c, parent, 1)
    kid = f"{state.instance_id}-kid"
    result = c.purge_orchestration(state.instance_id, recursive=True)
    assert result.deleted_instance_count == 2
    assert c.get_orchestration_state(state.instance_id) is None
    assert c.get_orchestration_state(kid) is None


def test_purge_keeps_a_running_instance(c: client.TaskHubGrpcClient) -> None:
    instance_id = running(c, waiter)
    assert c.purge_orchestration(instance_id).deleted_instance_count == 0
    assert c.get_orchestration_state(instance_id) is not None
    c.terminate_orchestration(instance_id)


def test_state_fields_the_sdk_reads(c: client.TaskHubGrpcClient) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    instance_id = c.schedule_new_orchestration(
        hello_cities, input={"k": 1}, instance_id="fields-1", tags={"team": "blue"}, version="1.2"
    )
    state = c.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None
    assert state.instance_id == "fields-1"
    assert state.name == "hello_cities"
    assert json.loads(state.serialized_input) == {"k": 1}
    assert state.failure_details is None
    assert (
        before <= state.created_at.replace(tzinfo=UTC) <= state.last_updated_at.replace(tzinfo=UTC)
    )
    no_payloads = c.get_orchestration_state(instance_id, fetch_payloads=False)
    assert no_payloads is not None and no_payloads.serialized_input is None


def test_starting_a_finished_id_again_replaces_it(c: client.TaskHubGrpcClient) -> None:
    first = run(c, hello_cities, instance_id="again-1")
    second = run(c, counter, 4, instance_id="again-1")
    assert first.name == "hello_cities" and second.name == "counter"
    assert json.loads(second.serialized_output) == 5


def test_several_workers_share_the_work(tmp_path: pathlib.Path) -> None:
    seen: set[int] = set()
    lock = threading.Lock()

    def where(ctx: task.ActivityContext, _: Any) -> int:
        with lock:
            seen.add(threading.get_ident())
        time.sleep(0.05)
        return 1

    def many(ctx: task.OrchestrationContext, n: int) -> Any:
        return sum((yield task.when_all([ctx.call_activity(where) for _ in range(n)])))

    with (
        running_sidecar(tmp_path) as sidecar,
        sdk_worker(sidecar.address, [many], [where]),
        sdk_worker(sidecar.address, [many], [where]),
    ):
        c = sdk_client(sidecar.address)
        ids = [c.schedule_new_orchestration(many, input=10) for _ in range(4)]
        for instance_id in ids:
            state = c.wait_for_orchestration_completion(instance_id, timeout=30)
            assert state is not None and json.loads(state.serialized_output) == 10
        assert "worker stream 2 connected" in sidecar.log_text()


def test_work_held_by_a_departed_worker_is_redelivered(tmp_path: pathlib.Path) -> None:
    gate = threading.Event()
    calls: list[str] = []

    def stuck(ctx: task.ActivityContext, _: Any) -> str:
        calls.append("first" if not calls else "again")
        if len(calls) == 1:
            gate.wait(30)  # the first worker never answers: it is stopped meanwhile
        return "done"

    def one(ctx: task.OrchestrationContext, _: Any) -> Any:
        return (yield ctx.call_activity(stuck))

    with running_sidecar(tmp_path) as sidecar:
        c = sdk_client(sidecar.address)
        with sdk_worker(sidecar.address, [one], [stuck]) as first:
            instance_id = c.schedule_new_orchestration(one)
            wait_until(lambda: bool(calls), what="the activity to start")
            # The worker's stream ends while its activity is still running (stop() cancels the
            # stream, then waits for in-flight work, so it runs beside the test).
            stopper = threading.Thread(target=first.stop)
            stopper.start()
            wait_until(
                lambda: "1 work item(s) it held will be redelivered" in sidecar.log_text(),
                what="the sidecar to notice the stream's end",
            )
            gate.set()  # the departed worker's late answer must not count
            stopper.join(30)
        with sdk_worker(sidecar.address, [one], [stuck]):
            state = c.wait_for_orchestration_completion(instance_id, timeout=30)
        assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
        assert json.loads(state.serialized_output) == "done"
        assert calls == ["first", "again"]
