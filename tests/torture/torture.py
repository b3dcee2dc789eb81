"""Crash torture: orchestrations run while sidecars are kill -9'ed and restarted, again and again.

    python tests/torture/torture.py [--orchestrations N] [--kills K] [--seed S] [--json FILE]
        [--store sqlite|postgres] [--sidecars M] [--lease-ttl SECONDS]

On sqlite, one dt-trio sidecar runs on a file; on PostgreSQL (a throwaway cluster, or the
server $DT_TRIO_TEST_PG), M sidecars share one task hub. Each sidecar has an official Python
SDK worker process of its own (reconnecting quickly); this process is the client, through any
live sidecar. N orchestrations each fan out to activities, wait on a durable timer, run a
sub-orchestration (with an activity and a timer of its own), receive an entity's answer, take
an entity's lock to read and increment a counter in its critical section, and wait for an
external event. Meanwhile a sidecar is SIGKILLed at random moments K times (with its worker,
when there are several sidecars: the others must take its work over once its leases expire)
and restarted on the same store and port.

Afterwards every orchestration must be COMPLETED with the output its code computes, and every
history must be whole: one start and one end, every scheduled task, timer and sub-orchestration
answered exactly once, no event id used twice. The counter's critical sections must have read
0, 1, ..., N-1 once each and left N (a lock held by two at once, or an entity operation applied
twice or lost, breaks that). Activities may run more than once (at-least-once delivery: an
activity that was running when its sidecar died runs again); the report counts the
re-executions, and on PostgreSQL how long each killed sidecar's leases kept its work.

Exit status 0 when everything holds; the report is printed and optionally written as JSON.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from durabletask import client, entities, history, task, worker
from durabletask.grpc_options import GrpcWorkerResiliencyOptions

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import _postgres
from _harness import Sidecar, Store

logging.disable(logging.ERROR)  # the SDK logs every lost connection; the report says enough

T = TypeVar("T")
FAN_OUT = 4
COUNTER = entities.EntityInstanceId("counter", "c")

# In a worker process: where it writes a line per activity execution (see `run_worker`).
_executions_fd = -1


def work(ctx: task.ActivityContext, x: int) -> int:
    # One write of one short line to a file opened for appending: whole even if killed.
    os.write(_executions_fd, f"{ctx.orchestration_id} {ctx.task_id}\n".encode())
    time.sleep(0.01)  # long enough to be caught in flight now and then
    return x * 2


def tally(ctx: entities.EntityContext, value: Any) -> Any:
    # Idempotent per caller, so a re-run batch cannot skew the answer.
    seen = ctx.get_state(dict, {})
    seen[value] = True
    ctx.set_state(seen)
    return len(seen)


def counter(ctx: entities.EntityContext, value: Any) -> Any:
    current = ctx.get_state(int, 0)
    if ctx.operation == "set":
        ctx.set_state(value)
    return current


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
    with (yield ctx.lock_entities([COUNTER])):
        ticket = yield ctx.call_entity(COUNTER, "get")
        yield ctx.call_entity(COUNTER, "set", ticket + 1)
    event = yield ctx.wait_for_external_event("go")
    return {
        "sum": sum(results),
        "sub": sub,
        "entity_ok": counted >= 1,
        "event": event,
        "ticket": ticket,
    }


def expected(n: int, ticket: Any) -> dict[str, Any]:
    return {
        "sum": sum((n * 10 + k) * 2 for k in range(FAN_OUT)),
        "sub": n * 2 + 1,
        "entity_ok": True,
        "event": f"go-{n}",
        "ticket": ticket,
    }


def run_worker(address: str, executions: pathlib.Path) -> None:
    """A worker process: the SDK's worker against `address`, reconnecting quickly, until
    killed; every activity execution is a line in `executions`."""
    global _executions_fd
    _executions_fd = os.open(executions, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    resiliency = GrpcWorkerResiliencyOptions(
        reconnect_backoff_base_seconds=0.05, reconnect_backoff_cap_seconds=0.5
    )
    w = worker.TaskHubGrpcWorker(host_address=address, resiliency_options=resiliency)
    for orchestrator in (mixed, child):
        w.add_orchestrator(orchestrator)
    w.add_activity(work)
    w.add_entity(tally)
    w.add_entity(counter)
    w.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    w.stop()


class Node:
    """One sidecar and its worker process. With `with_worker`, a kill takes both."""

    def __init__(self, store: Store, workdir: pathlib.Path, index: int, *args: str) -> None:
        self.sidecar = Sidecar(store, workdir / f"sidecar-{index}.log", *args)
        self.workdir = workdir
        self.index = index
        self.lives = 0
        self.worker: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.sidecar.proc is not None
        return self.sidecar.proc.pid

    def start(self) -> Node:
        self.sidecar.start(port=self.port)
        self.port = self.sidecar.port
        self.start_worker()
        return self

    def start_worker(self) -> None:
        self.lives += 1
        executions = self.workdir / f"executions-{self.index}-{self.lives}.txt"
        self.worker = subprocess.Popen(
            [sys.executable, __file__, "--worker", self.address, "--executions", str(executions)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self, with_worker: bool) -> None:
        self.sidecar.kill()
        if with_worker and self.worker is not None:
            self.worker.kill()
            self.worker.wait(10)
            self.worker = None

    def restart(self) -> None:
        self.sidecar.restart(port=self.port)
        if self.worker is None:
            self.start_worker()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.terminate()
            try:
                self.worker.wait(15)
            except subprocess.TimeoutExpired:
                self.worker.kill()
        if self.sidecar.proc is not None and self.sidecar.proc.poll() is None:
            self.sidecar.stop()


def executions(workdir: pathlib.Path) -> collections.Counter[tuple[str, int]]:
    counted: collections.Counter[tuple[str, int]] = collections.Counter()
    for path in workdir.glob("executions-*.txt"):
        for line in path.read_text().splitlines():
            orchestration_id, task_id = line.rsplit(" ", 1)
            counted[(orchestration_id, int(task_id))] += 1
    return counted


class Takeovers:
    """On PostgreSQL: how long a killed sidecar's leases keep its work from the others (until
    no row is leased by it: expired, cleared and free for another sidecar's lease)."""

    def __init__(self, address: str, hub: str) -> None:
        import psycopg

        self.conn = psycopg.connect(address, autocommit=True)
        self.schema = f"dt_trio_{hub}"
        self.seconds: list[float] = []
        self.held: list[int] = []
        self._threads: list[threading.Thread] = []

    def leased_by(self, pid: int) -> int:
        pattern = f"%:{pid}:%"
        total = 0
        for table in ("instances", "activities", "entities"):
            row = self.conn.execute(
                f"SELECT count(*) FROM {self.schema}.{table} WHERE lease_owner LIKE %s",
                (pattern,),
            ).fetchone()
            total += row[0] if row else 0
        return total

    def watch(self, pid: int, killed_at: float) -> None:
        held = self.leased_by(pid)
        self.held.append(held)
        if held:
            while self.leased_by(pid):
                time.sleep(0.05)
            self.seconds.append(time.monotonic() - killed_at)


def retrying(
    deadline: float,
    pick: Callable[[], client.TaskHubGrpcClient],
    method: str,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Call a client's `method` through sidecar restarts: UNAVAILABLE (and the like) is
    retried, through the client `pick` gives each time (a live sidecar's), until `deadline`."""
    while True:
        try:
            return getattr(pick(), method)(*args, **kwargs)
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


@contextlib.contextmanager
def stores(kind: str, count: int, workdir: pathlib.Path, lease_ttl: float) -> Iterator[Store]:
    """The task hub the sidecars share: an sqlite file, or a hub on PostgreSQL."""
    if kind == "sqlite":
        if count != 1:
            raise SystemExit("an sqlite file serves one sidecar: --sidecars 1, or --store postgres")
        yield Store(str(workdir / "torture.sqlite3"))
        return
    with _postgres.server() as address:
        yield Store(address, _postgres.new_hub(), lease_ttl)


def torture(
    orchestrations: int,
    kills: int,
    seed: int,
    workdir: pathlib.Path,
    store: Store,
    sidecars: int = 1,
) -> dict[str, Any]:
    rng = random.Random(seed)
    postgres = store.postgres
    nodes = [Node(store, workdir, i).start() for i in range(sidecars)]
    takeovers = Takeovers(store.db, store.hub) if postgres else None
    clients = [client.TaskHubGrpcClient(host_address=node.address) for node in nodes]
    down: set[int] = set()

    def any_client() -> client.TaskHubGrpcClient:
        return clients[rng.choice([i for i in range(sidecars) if i not in down] or [0])]

    deadline = time.monotonic() + 120 + orchestrations * 2
    ids = [f"torture-{seed}-{n}" for n in range(orchestrations)]
    downtime: list[float] = []
    started_at = time.monotonic()
    killer_error: list[BaseException] = []

    def killer() -> None:
        try:
            for _ in range(kills):
                time.sleep(rng.uniform(0.2, 1.2))
                index = rng.randrange(sidecars)
                node = nodes[index]
                pid = node.pid
                down.add(index)
                node.kill(with_worker=sidecars > 1)
                killed_at = time.monotonic()
                if takeovers is not None:
                    takeovers.watch(pid, killed_at)
                time.sleep(rng.uniform(0.0, 0.3))
                node.restart()
                down.discard(index)
                downtime.append(time.monotonic() - killed_at)
        except BaseException as exc:  # reported by the main thread
            killer_error.append(exc)

    chaos = threading.Thread(target=killer, name="killer")
    chaos.start()
    try:
        for n, instance_id in enumerate(ids):
            try:
                retrying(
                    deadline,
                    any_client,
                    "schedule_new_orchestration",
                    mixed,
                    input=n,
                    instance_id=instance_id,
                )
            except grpc.RpcError as exc:
                # The start committed but its answer was lost to a kill: the retry finds it.
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
            time.sleep(rng.uniform(0.0, 0.05))
        for n, instance_id in enumerate(ids):
            retrying(
                deadline,
                any_client,
                "raise_orchestration_event",
                instance_id,
                "go",
                data=f"go-{n}",
            )
        chaos.join()
        if killer_error:
            raise killer_error[0]
        states = {}
        for instance_id in ids:
            states[instance_id] = retrying(
                deadline,
                any_client,
                "wait_for_orchestration_completion",
                instance_id,
                timeout=int(max(1.0, deadline - time.monotonic())),
            )
        elapsed = time.monotonic() - started_at
        problems: list[str] = []
        tickets = []
        for n, instance_id in enumerate(ids):
            state = states[instance_id]
            if state is None or state.runtime_status != client.OrchestrationStatus.COMPLETED:
                status = None if state is None else state.runtime_status.name
                details = None if state is None else state.failure_details
                problems.append(f"{instance_id}: {status} {details}")
                continue
            output = json.loads(state.serialized_output or "null")
            tickets.append(output.get("ticket") if isinstance(output, dict) else None)
            if output != expected(n, tickets[-1]):
                problems.append(f"{instance_id}: output {state.serialized_output}")
            for execution in (instance_id, f"{instance_id}-child"):
                problems += check_history(
                    execution,
                    retrying(deadline, any_client, "get_orchestration_history", execution),
                )
        if sorted(t for t in tickets if isinstance(t, int)) != list(range(len(tickets))):
            problems.append(f"the counter's critical sections read {sorted(map(str, tickets))}")
        final = retrying(deadline, any_client, "get_entity", COUNTER)
        if final is None or final.get_state(int) != len(tickets):
            problems.append(f"the counter is {final and final.get_state(int)}, not {len(tickets)}")
        ran = executions(workdir)
        runs = sum(ran.values())
        tasks = len(ran)
        scheduled = orchestrations * (FAN_OUT + 1)
        if tasks != scheduled:
            problems.append(f"{tasks} distinct activities ran, {scheduled} were scheduled")
        report: dict[str, Any] = {
            "store": "postgres" if postgres else "sqlite",
            "sidecars": sidecars,
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
        if takeovers is not None:
            report["lease_ttl_seconds"] = store.lease_ttl
            report["leases_held_at_kills"] = takeovers.held
            report["takeover_seconds"] = [round(t, 2) for t in takeovers.seconds]
        return report
    finally:
        chaos.join()
        for c in clients:
            c.close()
        for node in nodes:
            node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orchestrations", type=int, default=20)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--sidecars", type=int, default=1)
    parser.add_argument("--lease-ttl", type=float, default=3.0, help="PostgreSQL (default: 3)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a worker process's sidecar
    parser.add_argument("--executions", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.executions)
        return 0
    with (
        tempfile.TemporaryDirectory() as tmp,
        stores(args.store, args.sidecars, pathlib.Path(tmp), args.lease_ttl) as store,
    ):
        workdir = pathlib.Path(tmp)
        report = torture(
            args.orchestrations,
            args.kills,
            args.seed,
            workdir,
            store,
            args.sidecars,
        )
        if report["problems"]:
            for log in sorted(workdir.glob("sidecar-*.log")):
                print(f"--- {log.name}", file=sys.stderr)
                print(log.read_text()[-4000:], file=sys.stderr)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
