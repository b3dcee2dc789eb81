"""kill -9 of the sidecar mid-orchestration loses nothing that was acknowledged."""

from __future__ import annotations

import json
import pathlib
import threading
from typing import Any

from _harness import Sidecar, a_store, sdk_client, sdk_worker, wait_until
from durabletask import history, task

STEPS = 8


def test_orchestration_survives_kill_9_and_restart_on_the_same_file(tmp_path: pathlib.Path) -> None:
    executed: list[int] = []
    lock = threading.Lock()
    release = threading.Event()

    def step(ctx: task.ActivityContext, i: int) -> int:
        with lock:
            executed.append(i)
        if i == 3:
            release.wait(30)  # hold step 3 in flight while the sidecar dies
        return i * 10

    def steps(ctx: task.OrchestrationContext, n: int) -> Any:
        out = []
        for i in range(n):
            out.append((yield ctx.call_activity(step, input=i)))
        return out

    sidecar = Sidecar(a_store(tmp_path), tmp_path / "sidecar.log").start()
    try:
        with sdk_worker(sidecar.address, [steps], [step]):
            c = sdk_client(sidecar.address)
            instance_id = c.schedule_new_orchestration(steps, input=STEPS)
            wait_until(lambda: 3 in executed, what="step 3 to start")
            sidecar.kill()  # SIGKILL: no shutdown code runs
            release.set()  # the worker's answer for step 3 now has nobody to go to
        sidecar.restart()  # the same store
        with sdk_worker(sidecar.address, [steps], [step]):
            c = sdk_client(sidecar.address)
            state = c.wait_for_orchestration_completion(instance_id, timeout=60)
        assert state is not None, sidecar.log_text()
        assert state.runtime_status.name == "COMPLETED", state.failure_details
        assert json.loads(state.serialized_output) == [i * 10 for i in range(STEPS)]
        # every step ran; only the one in flight at the kill may have run twice
        assert sorted(set(executed)) == list(range(STEPS))
        assert all(executed.count(i) == 1 for i in range(STEPS) if i != 3)
        events = c.get_orchestration_history(instance_id)
        scheduled = [e.event_id for e in events if isinstance(e, history.TaskScheduledEvent)]
        completed = [
            e.task_scheduled_id for e in events if isinstance(e, history.TaskCompletedEvent)
        ]
        assert len(scheduled) == len(set(scheduled)) == STEPS
        assert sorted(completed) == sorted(scheduled)
    finally:
        release.set()
        if sidecar.proc is not None and sidecar.proc.poll() is None:
            assert sidecar.stop() == 0


def test_a_pending_timer_and_event_survive_a_restart(tmp_path: pathlib.Path) -> None:
    from datetime import timedelta

    def patient(ctx: task.OrchestrationContext, _: Any) -> Any:
        yield ctx.create_timer(timedelta(seconds=1))
        return (yield ctx.wait_for_external_event("go"))

    sidecar = Sidecar(a_store(tmp_path), tmp_path / "sidecar.log").start()
    try:
        with sdk_worker(sidecar.address, [patient]):
            c = sdk_client(sidecar.address)
            instance_id = c.schedule_new_orchestration(patient)
            c.wait_for_orchestration_start(instance_id, timeout=10)
            sidecar.kill()
        sidecar.restart()
        with sdk_worker(sidecar.address, [patient]):
            c = sdk_client(sidecar.address)
            c.raise_orchestration_event(instance_id, "go", data="after the crash")
            state = c.wait_for_orchestration_completion(instance_id, timeout=30)
        assert state is not None and json.loads(state.serialized_output) == "after the crash"
    finally:
        if sidecar.proc is not None and sidecar.proc.poll() is None:
            assert sidecar.stop() == 0


def test_entity_state_locks_and_queued_operations_survive_kill_9(tmp_path: pathlib.Path) -> None:
    from durabletask import entities

    def tally(ctx: entities.EntityContext, value: Any) -> Any:
        current = ctx.get_state(int, 0)
        if ctx.operation == "add":
            ctx.set_state(current + value)
        elif ctx.operation == "set":
            ctx.set_state(value)
        return current

    def bump(ctx: task.OrchestrationContext, _: Any) -> Any:
        target = entities.EntityInstanceId("tally", "t")
        with (yield ctx.lock_entities([target])):
            value = yield ctx.call_entity(target, "get")
            yield ctx.wait_for_external_event("go")
            yield ctx.call_entity(target, "set", value + 1)
        return value

    entity = entities.EntityInstanceId("tally", "t")
    sidecar = Sidecar(a_store(tmp_path), tmp_path / "sidecar.log").start()
    try:
        with sdk_worker(sidecar.address, [bump], entities=[tally]):
            c = sdk_client(sidecar.address)
            c.signal_entity(entity, "add", 1)
            wait_until(lambda: _state(c, entity) == 1, what="the first signal")
            instance_id = c.schedule_new_orchestration(bump)
            wait_until(lambda: _locked_by(c, entity, instance_id), what="the lock")
            c.signal_entity(entity, "add", 10)  # queued behind the lock
            sidecar.kill()
        sidecar.restart()
        with sdk_worker(sidecar.address, [bump], entities=[tally]):
            c = sdk_client(sidecar.address)
            assert _state(c, entity) == 1  # the lock still holds the +10 back
            c.raise_orchestration_event(instance_id, "go")
            state = c.wait_for_orchestration_completion(instance_id, timeout=30)
            assert state is not None and state.runtime_status.name == "COMPLETED"
            wait_until(lambda: _state(c, entity) == 12, what="set(2) then +10")
    finally:
        if sidecar.proc is not None and sidecar.proc.poll() is None:
            assert sidecar.stop() == 0


def _state(c: Any, entity: Any) -> Any:
    metadata = c.get_entity(entity)
    return None if metadata is None else metadata.get_state(int)


def _locked_by(c: Any, entity: Any, instance_id: str) -> bool:
    metadata = c.get_entity(entity, include_state=False)
    return metadata is not None and metadata._locked_by == instance_id


def test_sigterm_under_load_stops_cleanly_and_a_restart_finishes_everything(
    tmp_path: pathlib.Path,
) -> None:
    def triple(ctx: task.ActivityContext, n: int) -> int:
        return n * 3

    def loaded(ctx: task.OrchestrationContext, n: int) -> Any:
        a = yield ctx.call_activity(triple, input=n)
        return (yield ctx.call_activity(triple, input=a))

    count = 500
    sidecar = Sidecar(a_store(tmp_path), tmp_path / "sidecar.log").start()
    try:
        with sdk_worker(sidecar.address, [loaded], [triple]):
            c = sdk_client(sidecar.address)
            ids = [c.schedule_new_orchestration(loaded, input=n) for n in range(count)]
            # some finished, many in flight
            c.wait_for_orchestration_completion(ids[count // 10], timeout=60)
            assert sidecar.stop() == 0  # SIGTERM: drains and exits cleanly
        log = sidecar.log_text()
        assert "received SIGTERM, shutting down" in log
        assert "backend stopped" in log
        sidecar.restart()
        with sdk_worker(sidecar.address, [loaded], [triple]):
            c = sdk_client(sidecar.address)
            for n, instance_id in enumerate(ids):
                state = c.wait_for_orchestration_completion(instance_id, timeout=120)
                assert state is not None and state.runtime_status.name == "COMPLETED"
                assert json.loads(state.serialized_output) == n * 9
    finally:
        if sidecar.proc is not None and sidecar.proc.poll() is None:
            assert sidecar.stop() == 0
