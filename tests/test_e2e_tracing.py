"""Traces: the official SDK's spans form one whole tree through dt-trio, across a kill -9.

The SDK (with OpenTelemetry installed) emits its own spans and relies on the sidecar to carry the
W3C trace context: the client's context on the start, each orchestration's span id and start
time between its steps (OrchestratorRequest.orchestrationTraceContext), the context of each
activity and sub-orchestration call. The SDK's worker and client run as processes of their own
that export over OTLP/HTTP to a receiver in this test.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from collections import Counter

import pytest
from _harness import Sidecar, running_sidecar, sdk_client, sdk_worker
from _otlp import Receiver, Span, otlp_receiver

pytestmark = pytest.mark.slow

APP = pathlib.Path(__file__).with_name("otel_sdk_app.py")


def _env(receiver: Receiver, service: str) -> dict[str, str]:
    return dict(
        os.environ,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_SERVICE_NAME=service,
        OTEL_BSP_SCHEDULE_DELAY="100",  # ms: export soon, not every 5 s
        PYTHONUNBUFFERED="1",
    )


def _run(receiver: Receiver, service: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(APP), *args],
        env=_env(receiver, service),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


class _Worker:
    def __init__(self, receiver: Receiver, address: str, log: pathlib.Path) -> None:
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(APP), "worker", address],
            env=_env(receiver, "hello-worker"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"worker started\n"

    def stop(self) -> None:
        """Close its stdin: it stops its worker, flushes its spans and exits."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(60) == 0
        self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def _ancestors(span: Span, by_id: dict[str, Span]) -> list[Span]:
    chain = []
    while span.parent_id in by_id:
        span = by_id[span.parent_id]
        chain.append(span)
    return chain


@pytest.mark.store_independent
def test_the_sdk_spans_form_one_tree_across_a_kill_9(tmp_path: pathlib.Path) -> None:
    with otlp_receiver() as receiver:
        sidecar = Sidecar(str(tmp_path / "hub.sqlite3"), tmp_path / "sidecar.log").start()
        worker = _Worker(receiver, sidecar.address, tmp_path / "worker.log")
        try:
            _run(receiver, "hello-client", "start", sidecar.address, "traced")
            # Both orchestrations wait now (the waiter for its event, its parent for it).
            sidecar.kill()
            killed_at = time.time_ns()
            worker.stop()
            sidecar.restart()
            worker = _Worker(receiver, sidecar.address, tmp_path / "worker.log")
            out = _run(receiver, "hello-client", "finish", sidecar.address, "traced")
            worker.stop()
        finally:
            worker.kill()
            if sidecar.proc is not None and sidecar.proc.poll() is None:
                assert sidecar.stop() == 0
        spans = list(receiver.spans)

    check_hello_tree(out, spans, killed_at, "traced", "hello-client")


@pytest.mark.store_independent
def test_the_local_api_emits_the_same_tree_across_a_kill_9(tmp_path: pathlib.Path) -> None:
    """The local Python API has no SDK: dt-trio emits the same spans itself."""
    db = str(tmp_path / "hub.sqlite3")
    app = str(APP.with_name("otel_local_app.py"))
    with otlp_receiver() as receiver:
        started = subprocess.run(
            [sys.executable, app, "start", db, "local"],
            env=_env(receiver, "hello-local"),
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert started.returncode == -9, started.stderr[-4000:]  # it killed itself
        killed_at = time.time_ns()
        finished = subprocess.run(
            [sys.executable, app, "finish", db, "local"],
            env=_env(receiver, "hello-local"),
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert finished.returncode == 0, finished.stderr[-4000:]
        spans = list(receiver.spans)
    spans = [s for s in spans if s.scope != "hello-app"]
    user = [s for s in receiver.spans if s.scope == "hello-app"]
    check_hello_tree(finished.stdout, spans, killed_at, "local", "hello-local")
    # The application's own spans in activities (run in threads) nest under their run.
    by_id = {s.span_id: s for s in spans}
    assert len(user) == 5
    for span in user:
        run = by_id[span.parent_id]
        assert (run.name, run.kind) == ("activity:say_hello", "SERVER")


def check_hello_tree(
    out: str, spans: list[Span], killed_at: int, instance_id: str, client: str
) -> None:
    """The spans of one hello-cities run (tests/otel_*_app.py) form the SDK's tree."""
    status, output = out.split(" ", 1)
    assert status == "COMPLETED"
    assert json.loads(output) == [
        "Hello, Tokyo!",
        "Hello, Seattle!",
        "Hello, London!",
        "Hello, Paris!",
        "flaky failed",
        "Hello, Oslo!",
    ]
    # A raised event carries no trace context in the protocol: the client's span for it is
    # a trace of its own.
    (raised,) = [s for s in spans if s.name == "orchestration_event:continue"]
    assert raised.attributes["durabletask.event.target_instance_id"] == f"{instance_id}-waiter"
    spans.remove(raised)
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans), "no span was exported twice"
    assert {s.trace_id for s in spans} == {spans[0].trace_id}, "one trace"

    def named(name: str, kind: str) -> list[Span]:
        return [s for s in spans if s.name == name and s.kind == kind]

    (create,) = named("create_orchestration:hello_cities", "PRODUCER")
    assert create.service == client and create.parent_id == ""

    # One orchestration span each, emitted once, with the start of its first step.
    orchestrations = Counter(s.name for s in spans if s.kind == "SERVER" and "orch" in s.name)
    assert orchestrations == {
        "orchestration:hello_cities": 1,
        "orchestration:greet": 1,
        "orchestration:waiter": 1,
    }
    (parent,) = named("orchestration:hello_cities", "SERVER")
    (greet,) = named("orchestration:greet", "SERVER")
    (waiter,) = named("orchestration:waiter", "SERVER")
    assert parent.parent_id == create.span_id
    assert create.start_ns <= parent.start_ns < waiter.start_ns < killed_at < waiter.end_ns
    assert parent.start_ns < greet.start_ns < greet.end_ns < killed_at < parent.end_ns
    assert parent.attributes["durabletask.task.instance_id"] == instance_id
    assert waiter.attributes["durabletask.task.instance_id"] == f"{instance_id}-waiter"
    assert not parent.error and not waiter.error

    # Each child orchestration under its parent's call span, under the parent's span.
    for child, name in ((greet, "greet"), (waiter, "waiter")):
        call = by_id[child.parent_id]
        assert (call.name, call.kind, call.parent_id) == (
            f"orchestration:{name}",
            "CLIENT",
            parent.span_id,
        )

    # Every activity run under its call, under the orchestration that called it: 3 cities,
    # Paris in greet, the failing one, Oslo in the waiter after the restart.
    runs = [s for s in spans if s.name.startswith("activity:") and s.kind == "SERVER"]
    assert Counter(s.name for s in runs) == {"activity:say_hello": 5, "activity:flaky": 1}
    callers: Counter[str] = Counter()
    for run in runs:
        call = by_id[run.parent_id]
        assert (call.name, call.kind) == (run.name, "CLIENT")
        assert call.start_ns <= run.start_ns and run.end_ns <= call.end_ns
        assert run.error == call.error == (run.name == "activity:flaky")
        callers[by_id[call.parent_id].name] += 1
    assert callers == {
        "orchestration:hello_cities": 4,
        "orchestration:greet": 1,
        "orchestration:waiter": 1,
    }

    (timer,) = named("orchestration:hello_cities:timer", "INTERNAL")
    assert timer.parent_id == parent.span_id
    # The attributes of each kind of span, as the SDK writes them (both runs are held to it).
    base = {"durabletask.type", "durabletask.task.name", "durabletask.task.instance_id"}
    shapes = {
        ("PRODUCER", "orchestration"): base,
        ("SERVER", "orchestration"): base | {"durabletask.task.status"},
        ("CLIENT", "orchestration"): base | {"durabletask.task.task_id"},
        ("CLIENT", "activity"): base | {"durabletask.task.task_id"},
        ("SERVER", "activity"): base | {"durabletask.task.task_id"},
        ("INTERNAL", "timer"): base | {"durabletask.task.task_id", "durabletask.fire_at"},
    }
    for span in spans:
        assert set(span.attributes) == shapes[span.kind, span.attributes["durabletask.type"]]
    assert timer.attributes["durabletask.task.name"] == "hello_cities"
    # ... and nothing is left out of the tree.
    for span in spans:
        assert span is create or create in _ancestors(span, by_id), span


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_restarted_instance_runs_in_the_trace_of_its_first_start(
    tmp_path: pathlib.Path,
) -> None:
    """RestartInstance carries no trace context of its own: the new run is started under the
    context of the first start, so that its SDK spans form a tree again (without any, each
    activity's span would be a trace of its own)."""
    import grpc
    from durabletask import task
    from durabletask.internal import orchestrator_service_pb2 as pb
    from durabletask.internal import orchestrator_service_pb2_grpc as stubs

    def quick(ctx: task.OrchestrationContext, _: object) -> str:
        return "done"

    def started_under(stub: stubs.TaskHubSidecarServiceStub, instance_id: str) -> str:
        request = pb.StreamInstanceHistoryRequest(instanceId=instance_id)
        for chunk in stub.StreamInstanceHistory(request):
            for event in chunk.events:
                if event.HasField("executionStarted"):
                    return str(event.executionStarted.parentTraceContext.traceParent)
        raise AssertionError("no ExecutionStarted")

    with (
        running_sidecar(tmp_path) as sidecar,
        grpc.insecure_channel(sidecar.address) as channel,
        sdk_worker(sidecar.address, [quick]),
    ):
        stub = stubs.TaskHubSidecarServiceStub(channel)
        c = sdk_client(sidecar.address)
        start = pb.CreateInstanceRequest(instanceId="again", name="quick")
        start.parentTraceContext.traceParent = TRACEPARENT
        stub.StartInstance(start)
        c.wait_for_orchestration_completion("again", timeout=30)
        assert started_under(stub, "again") == TRACEPARENT
        c.restart_orchestration("again")
        c.wait_for_orchestration_completion("again", timeout=30)
        assert started_under(stub, "again") == TRACEPARENT
        other = c.restart_orchestration("again", restart_with_new_instance_id=True)
        c.wait_for_orchestration_completion(other, timeout=30)
        assert started_under(stub, other) == TRACEPARENT
