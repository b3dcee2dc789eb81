"""Crash torture: orchestrations run while the sidecar is kill -9'ed and restarted, again and again.

    python tests/torture/torture.py [--orchestrations N] [--kills K] [--seed S] [--json FILE]

One dt-trio sidecar runs on an sqlite file; this process runs the official Python SDK's worker
(reconnecting quickly) and client. N orchestrations each fan out to activities, wait on a
durable timer, run a sub-orchestration (with an activity and a timer of its own), receive an
entity's answer and wait for an external event. Meanwhile the sidecar is SIGKILLed at random
moments K times and restarted on the same file and port.

Afterwards every orchestration must be COMPLETED with the output its code computes, and every
history must be whole: one start and one end, every scheduled task, timer and sub-orchestration
answered exactly once, no event id used twice. Activities may run more than once (at-least-once
delivery: an activity that was running when the sidecar died runs again); the report counts the
re-executions. A lost completion shows up as an instance that never finishes.

Exit status 0 when everything holds; the report is printed and optionally written as JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import pathlib
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from durabletask import client, entities, history, task, worker
from durabletask.grpc_options import GrpcWorkerResiliencyOptions

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from _harness import Sidecar

logging.disable(logging.ERROR)  # the SDK logs every lost connection; the report says enough

T = TypeVar("T")
FAN_OUT = 4

executions: collections.Counter[tuple[str, int]] = collections.Counter()
executions_lock = threading.Lock()


def work(ctx: task.ActivityContext, x: int) -> int:
    with executions_lock:
        executions[(ctx.orchestration_id, ctx.task_id)] += 1
    time.sleep(0.01)  # long enough to be caught in flight now and then
    return x * 2


def tally(ctx: entities.EntityContext, value: Any) -> Any:
    # Idempotent per caller, so a re-run batch cannot skew the answer.
    seen = ctx.get_state(dict, {})
    seen[value] = True
    ctx.set_state(seen)
    return len(seen)


def child(ctx: task.OrchestrationContext, n: int) -> Any:
    doubled = yield ctx.call_activity(work, input=n)
    yield ctx.create_timer(timedelta(milliseconds=200))
    return doubled + 1


def mixed(ctx: task.OrchestrationContext, n: int) -> Any:
    results = yield task.when_all(
        [ctx.call_activity(work, input=n * 10 + k) for k in range(FAN_OUT)]
    )
    yield ctx.create_timer(timedelta(milliseconds=300))
    sub = yield ctx.call_sub_orchestrator(child, input=n, instance_id=f"{ctx.instance_id}-child")
    counted = yield ctx.call_entity(entities.EntityInstanceId("tally", "t"), "add", ctx.instance_id)
    event = yield ctx.wait_for_external_event("go")
    return {"sum": sum(results), "sub": sub, "entity_ok": counted >= 1, "event": event}


def expected(n: int) -> dict[str, Any]:
    return {
        "sum": sum((n * 10 + k) * 2 for k in range(FAN_OUT)),
        "sub": n * 2 + 1,
        "entity_ok": True,
        "event": f"go-{n}",
    }


def retrying(deadline: float, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call through sidecar restarts: UNAVAILABLE (and the like) is retried until `deadline`."""
    while True:
        try:
            return call(*args, **kwargs)
        except grpc.RpcError as exc:
            transient = exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNKNOWN,
                grpc.StatusCode.INTERNAL,
            )
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def check_history(instance_id: str, events: list[history.HistoryEvent]) -> list[str]:
    """What is wrong with one execution's history (empty when it is whole)."""
    problems = []
    kinds = collections.Counter(type(e).__name__ for e in events)
    if kinds["ExecutionStartedEvent"] != 1 or kinds["ExecutionCompletedEvent"] != 1:
        problems.append(f"{instance_id}: {dict(kinds)} (one start and one end expected)")
    ids = [
        e.event_id
        for e in events
        if isinstance(
            e,
            history.TaskScheduledEvent
            | history.TimerCreatedEvent
            | history.SubOrchestrationInstanceCreatedEvent,
        )
    ]
    if len(ids) != len(set(ids)):
        problems.append(f"{instance_id}: an event id is used twice in {sorted(ids)}")
    answers = collections.Counter(
        e.task_scheduled_id
        for e in events
        if isinstance(
            e, history.TaskCompletedEvent | history.SubOrchestrationInstanceCompletedEvent
        )
    )
    answers.update(e.timer_id for e in events if isinstance(e, history.TimerFiredEvent))
    for event_id in ids:
        if answers[event_id] != 1:
            problems.append(f"{instance_id}: task {event_id} answered {answers[event_id]} times")
    extra = set(answers) - set(ids)
    if extra:
        problems.append(f"{instance_id}: answers for tasks never scheduled: {sorted(extra)}")
    return problems


def torture(orchestrations: int, kills: int, seed: int, workdir: pathlib.Path) -> dict[str, Any]:
    rng = random.Random(seed)
    sidecar = Sidecar(str(workdir / "torture.sqlite3"), workdir / "sidecar.log").start()
    port = sidecar.port
    resiliency = GrpcWorkerResiliencyOptions(
        reconnect_backoff_base_seconds=0.05, reconnect_backoff_cap_seconds=0.5
    )
    w = worker.TaskHubGrpcWorker(host_address=sidecar.address, resiliency_options=resiliency)
    for orchestrator in (mixed, child):
        w.add_orchestrator(orchestrator)
    w.add_activity(work)
    w.add_entity(tally)
    c = client.TaskHubGrpcClient(host_address=sidecar.address)
    deadline = time.monotonic() + 120 + orchestrations * 2
    ids = [f"torture-{seed}-{n}" for n in range(orchestrations)]
    downtime: list[float] = []
    started_at = time.monotonic()
    w.start()
    killer_error: list[BaseException] = []

    def killer() -> None:
        try:
            for _ in range(kills):
                time.sleep(rng.uniform(0.2, 1.2))
                sidecar.kill()
                down = time.monotonic()
                time.sleep(rng.uniform(0.0, 0.3))
                sidecar.restart(port=port)
                downtime.append(time.monotonic() - down)
        except BaseException as exc:  # reported by the main thread
            killer_error.append(exc)

    chaos = threading.Thread(target=killer, name="killer")
    chaos.start()
    try:
        for n, instance_id in enumerate(ids):
            try:
                retrying(
                    deadline, c.schedule_new_orchestration, mixed, input=n, instance_id=instance_id
                )
            except grpc.RpcError as exc:
                # The start committed but its answer was lost to a kill: the retry finds it.
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
            time.sleep(rng.uniform(0.0, 0.05))
        for n, instance_id in enumerate(ids):
            retrying(deadline, c.raise_orchestration_event, instance_id, "go", data=f"go-{n}")
        chaos.join()
        if killer_error:
            raise killer_error[0]
        states = {}
        for instance_id in ids:
            remaining = max(1.0, deadline - time.monotonic())
            states[instance_id] = retrying(
                deadline, c.wait_for_orchestration_completion, instance_id, timeout=int(remaining)
            )
        elapsed = time.monotonic() - started_at
        problems: list[str] = []
        for n, instance_id in enumerate(ids):
            state = states[instance_id]
            if state is None or state.runtime_status != client.OrchestrationStatus.COMPLETED:
                status = None if state is None else state.runtime_status.name
                details = None if state is None else state.failure_details
                problems.append(f"{instance_id}: {status} {details}")
                continue
            if json.loads(state.serialized_output or "null") != expected(n):
                problems.append(f"{instance_id}: output {state.serialized_output}")
            for execution in (instance_id, f"{instance_id}-child"):
                problems += check_history(execution, c.get_orchestration_history(execution))
        with executions_lock:
            runs = sum(executions.values())
            tasks = len(executions)
        scheduled = orchestrations * (FAN_OUT + 1)
        if tasks != scheduled:
            problems.append(f"{tasks} distinct activities ran, {scheduled} were scheduled")
        return {
            "orchestrations": orchestrations,
            "kills": kills,
            "seed": seed,
            "seconds": round(elapsed, 1),
            "mean_restart_seconds": round(sum(downtime) / len(downtime), 3) if downtime else 0,
            "activities_scheduled": scheduled,
            "activity_executions": runs,
            "activity_reexecutions": runs - tasks,
            "completed": sum(
                1
                for s in states.values()
                if s is not None and s.runtime_status == client.OrchestrationStatus.COMPLETED
            ),
            "problems": problems,
        }
    finally:
        chaos.join()
        w.stop()
        c.close()
        if sidecar.proc is not None and sidecar.proc.poll() is None:
            sidecar.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orchestrations", type=int, default=20)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = torture(args.orchestrations, args.kills, args.seed, pathlib.Path(tmp))
        if report["problems"]:
            print((pathlib.Path(tmp) / "sidecar.log").read_text()[-6000:], file=sys.stderr)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
