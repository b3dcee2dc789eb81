"""dt-trio driven by the Python SDK 0.1.0, of the protocol generation before completion tokens
and health pings (as durabletask-go's worker, which it was ported from): its worker answers
with instance and task ids only, and its client knows none of the newer fields.

Run by `nox -s generations` in an environment of its own (the file is not collected by the
main test session, which has the current SDK).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import durabletask
from _harness import Gate, Sidecar, sdk_client, sdk_worker, wait_until
from durabletask import client, task

assert not hasattr(durabletask, "entities"), "this module drives the SDK of 2023 (0.1.0)"


def double(ctx: task.ActivityContext, n: int) -> int:
    return 2 * n


def shout(ctx: task.ActivityContext, word: str) -> str:
    return word.upper()


def chain(ctx: task.OrchestrationContext, n: int) -> Any:
    n = yield ctx.call_activity(double, input=n)
    return (yield ctx.call_activity(double, input=n))


def napper(ctx: task.OrchestrationContext, _: Any) -> Any:
    yield ctx.create_timer(timedelta(seconds=0.2))
    return "rested"


def listener(ctx: task.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.wait_for_external_event("go"))


def parent(ctx: task.OrchestrationContext, n: int) -> Any:
    return (yield ctx.call_sub_orchestrator(chain, input=n)) + 1


def chorus(ctx: task.OrchestrationContext, words: list[str]) -> Any:
    return (yield task.when_all([ctx.call_activity(shout, input=w) for w in words]))


SLOW, FAST = Gate(), Gate()


def slow(ctx: task.ActivityContext, _: Any) -> str:
    SLOW.wait()
    return "slow"


def fast(ctx: task.ActivityContext, _: Any) -> str:
    FAST.wait()
    return "fast"


def eternal(ctx: task.OrchestrationContext, generation: int) -> Any:
    if generation == 0:
        ctx.call_activity(slow)  # left running: the next execution does not wait for it
        yield ctx.wait_for_external_event("next")
        ctx.continue_as_new(1)
        return None
    return (yield ctx.call_activity(fast))


def test_every_pattern_runs_on_the_old_worker(sidecar: Sidecar) -> None:
    orchestrators: list[Callable[..., Any]] = [chain, napper, listener, parent, chorus]
    with sdk_worker(sidecar.address, orchestrators, [double, shout]):
        c = sdk_client(sidecar.address)
        ids = {
            "chain": c.schedule_new_orchestration(chain, input=3),
            "napper": c.schedule_new_orchestration(napper),
            "listener": c.schedule_new_orchestration(listener),
            "parent": c.schedule_new_orchestration(parent, input=5),
            "chorus": c.schedule_new_orchestration(chorus, input=["a", "b", "c"]),
        }
        assert c.wait_for_orchestration_start(ids["listener"], timeout=30) is not None
        c.raise_orchestration_event(ids["listener"], "go", data="heard")
        outputs = {}
        for name, instance_id in ids.items():
            state = c.wait_for_orchestration_completion(instance_id, timeout=30)
            assert state is not None, name
            assert state.runtime_status == client.OrchestrationStatus.COMPLETED, (
                name,
                state.failure_details,
            )
            outputs[name] = state.serialized_output
    assert outputs == {
        "chain": "12",
        "napper": '"rested"',
        "listener": '"heard"',
        "parent": "21",
        "chorus": '["A", "B", "C"]',
    }
    assert "is refused" not in sidecar.log_text()


def test_an_activity_left_running_by_an_execution_never_answers_for_the_next_one(
    sidecar: Sidecar,
) -> None:
    """After continue-as-new, the new execution's first activity has the task id of the old
    execution's still running one: the old worker's answer names both (instance, task id).
    The new one is not handed to such a worker until the old one is answered."""
    with sdk_worker(sidecar.address, [eternal], [slow, fast]):
        c = sdk_client(sidecar.address)
        instance_id = c.schedule_new_orchestration(eternal, input=0)
        assert SLOW.entered.wait(30)
        c.raise_orchestration_event(instance_id, "next")
        wait_until(
            lambda: (
                (s := c.get_orchestration_state(instance_id)) is not None
                and s.serialized_input == "1"
            ),
            timeout=30,
            what="the next execution",
        )
        assert not FAST.entered.is_set()  # it waits for the slow one's answer
        SLOW.opened.set()
        assert FAST.entered.wait(30)
        FAST.opened.set()
        state = c.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None and state.serialized_output == '"fast"'
