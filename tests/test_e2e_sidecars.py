"""Several sidecars on one PostgreSQL task hub, through the official SDK: work scheduled
through one runs on a worker connected to another, and a wait on one answers when another
commits."""

from __future__ import annotations

import json
import pathlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from _harness import Sidecar, Store, a_store, sdk_client, sdk_worker
from durabletask import client, task

pytestmark = pytest.mark.postgres_only


def greet(ctx: task.ActivityContext, name: str) -> str:
    return f"hello {name}"


def greeting(ctx: task.OrchestrationContext, name: str) -> Any:
    return (yield ctx.call_activity(greet, input=name))


def waits(ctx: task.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.wait_for_external_event("go"))


@pytest.fixture
def two(tmp_path: pathlib.Path) -> Iterator[tuple[Sidecar, Sidecar]]:
    store: Store = a_store(tmp_path)
    a = Sidecar(store, tmp_path / "a.log").start()
    try:
        b = Sidecar(store, tmp_path / "b.log").start()
        try:
            yield a, b
        finally:
            assert b.stop() == 0, b.log_text()
    finally:
        assert a.stop() == 0, a.log_text()


def test_work_scheduled_through_one_sidecar_runs_on_a_worker_of_another(
    two: tuple[Sidecar, Sidecar],
) -> None:
    a, b = two
    with sdk_worker(b.address, [greeting], [greet]):  # no worker on a
        started = sdk_client(a.address)
        instance_id = started.schedule_new_orchestration(greeting, input="from a")
        state = started.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None and state.runtime_status == client.OrchestrationStatus.COMPLETED
    assert json.loads(state.serialized_output or "null") == "hello from a"


def test_a_wait_on_one_sidecar_answers_when_another_commits(
    two: tuple[Sidecar, Sidecar],
) -> None:
    a, b = two
    with sdk_worker(a.address, [waits]):  # the work is a's
        instance_id = sdk_client(a.address).schedule_new_orchestration(waits)
        sdk_client(a.address).wait_for_orchestration_start(instance_id, timeout=30)
        answered: list[Any] = []
        waiting = threading.Thread(
            target=lambda: answered.append(
                sdk_client(b.address).wait_for_orchestration_completion(instance_id, timeout=30)
            )
        )
        waiting.start()
        sdk_client(a.address).raise_orchestration_event(instance_id, "go", data="done on a")
        waiting.join(40)
    # (b's waiter hears of a's commit only through a's notification: nothing polls for it)
    [state] = answered
    assert state is not None and json.loads(state.serialized_output or "null") == "done on a"
