"""The official SDK's worker or client, traced with OpenTelemetry configured the standard way
(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME), as tests/test_e2e_tracing.py runs them:

    python tests/otel_sdk_app.py worker ADDRESS          # serves until stdin closes
    python tests/otel_sdk_app.py start ADDRESS ID        # hello_cities as ID; returns once its
                                                         # waiter sub-orchestration waits
    python tests/otel_sdk_app.py finish ADDRESS ID       # lets the waiter go; prints the output

Each process exports its spans over OTLP/HTTP and flushes them before it exits.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any

from durabletask import client, task, worker
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def say_hello(ctx: task.ActivityContext, city: str) -> str:
    return f"Hello, {city}!"


def flaky(ctx: task.ActivityContext, _: Any) -> None:
    raise ValueError("this activity always fails")


def greet(ctx: task.OrchestrationContext, city: str) -> Any:
    return (yield ctx.call_activity(say_hello, input=city))


def waiter(ctx: task.OrchestrationContext, _: Any) -> Any:
    yield ctx.wait_for_external_event("continue")
    return (yield ctx.call_activity(say_hello, input="Oslo"))


def hello_cities(ctx: task.OrchestrationContext, _: Any) -> Any:
    out = []
    for city in ("Tokyo", "Seattle", "London"):
        out.append((yield ctx.call_activity(say_hello, input=city)))
    out.append((yield ctx.call_sub_orchestrator(greet, input="Paris")))
    yield ctx.create_timer(timedelta(milliseconds=50))
    try:
        yield ctx.call_activity(flaky)
    except task.TaskFailedError:
        out.append("flaky failed")
    # The test kills the sidecar while this child waits for its event.
    out.append((yield ctx.call_sub_orchestrator(waiter, instance_id=f"{ctx.instance_id}-waiter")))
    return out


def main(mode: str, address: str, instance_id: str = "") -> None:
    provider = TracerProvider(resource=Resource.create())  # OTEL_SERVICE_NAME
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # ..._OTLP_ENDPOINT
    trace.set_tracer_provider(provider)
    try:
        if mode == "worker":
            w = worker.TaskHubGrpcWorker(host_address=address)
            for orchestrator in (hello_cities, greet, waiter):
                w.add_orchestrator(orchestrator)
            w.add_activity(say_hello)
            w.add_activity(flaky)
            w.start()
            print("worker started", flush=True)
            sys.stdin.read()  # until the test closes it
            w.stop()
        elif mode == "start":
            c = client.TaskHubGrpcClient(host_address=address)
            c.schedule_new_orchestration(hello_cities, instance_id=instance_id)
            # The waiter exists once its parent got that far (no rpc waits for an instance
            # to exist), then has started once its first step is committed.
            deadline = time.monotonic() + 30
            while c.get_orchestration_state(f"{instance_id}-waiter") is None:
                assert time.monotonic() < deadline, "the waiter was never created"
                time.sleep(0.02)
            c.wait_for_orchestration_start(f"{instance_id}-waiter", timeout=30)
        elif mode == "finish":
            c = client.TaskHubGrpcClient(host_address=address)
            c.raise_orchestration_event(f"{instance_id}-waiter", "continue")
            state = c.wait_for_orchestration_completion(instance_id, timeout=30)
            assert state is not None
            print(state.runtime_status.name, state.serialized_output, flush=True)
    finally:
        provider.shutdown()  # exports what is left


if __name__ == "__main__":
    main(*sys.argv[1:])
