"""Hello cities on the local Python API, traced with OpenTelemetry configured the standard way
(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME), as tests/test_e2e_tracing.py runs it:

    python tests/otel_local_app.py start DB ID    # hello_cities as ID, then kill -9 of this
                                                  # process once its waiter child waits
    python tests/otel_local_app.py finish DB ID   # a new process lets the waiter go; prints
                                                  # the status and the output
"""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import timedelta
from typing import Any

import trio
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import dt_trio

registry = dt_trio.Registry()
app = trace.get_tracer("hello-app")


@registry.activity
def say_hello(ctx: dt_trio.ActivityContext, city: str) -> str:
    with app.start_as_current_span("compose greeting"):  # the application's own span
        return f"Hello, {city}!"


@registry.activity
async def flaky(ctx: dt_trio.ActivityContext, _: Any) -> None:
    raise ValueError("this activity always fails")


@registry.orchestrator
def greet(ctx: dt_trio.OrchestrationContext, city: str) -> Any:
    return (yield ctx.call_activity(say_hello, input=city))


@registry.orchestrator
def waiter(ctx: dt_trio.OrchestrationContext, _: Any) -> Any:
    yield ctx.wait_for_external_event("continue")
    return (yield ctx.call_activity(say_hello, input="Oslo"))


@registry.orchestrator
def hello_cities(ctx: dt_trio.OrchestrationContext, _: Any) -> Any:
    out = []
    for city in ("Tokyo", "Seattle", "London"):
        out.append((yield ctx.call_activity(say_hello, input=city)))
    out.append((yield ctx.call_sub_orchestrator(greet, input="Paris")))
    yield ctx.create_timer(timedelta(milliseconds=50))
    try:
        yield ctx.call_activity(flaky)
    except dt_trio.TaskFailedError:
        out.append("flaky failed")
    ctx.set_custom_status("waiting")
    child = ctx.call_sub_orchestrator(waiter, instance_id=f"{ctx.instance_id}-waiter")
    out.append((yield child))
    return out


async def start(db: str, instance_id: str, provider: TracerProvider) -> None:
    async with dt_trio.open_task_hub(db, registry=registry) as client:
        await client.schedule(hello_cities, instance_id=instance_id)
        await client.wait_until(instance_id, lambda s: s.custom_status == "waiting")
        await client.wait_for_start(f"{instance_id}-waiter")
        provider.force_flush()
        os.kill(os.getpid(), signal.SIGKILL)  # the hub dies with its orchestrations waiting


async def finish(db: str, instance_id: str) -> None:
    async with dt_trio.open_task_hub(db, registry=registry) as client:
        await client.raise_event(f"{instance_id}-waiter", "continue")
        state = await client.wait_for_completion(instance_id)
        print(state.status.name, json.dumps(state.output), flush=True)


def main(mode: str, db: str, instance_id: str) -> None:
    provider = TracerProvider(resource=Resource.create())  # OTEL_SERVICE_NAME
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # ..._OTLP_ENDPOINT
    trace.set_tracer_provider(provider)
    try:
        if mode == "start":
            trio.run(start, db, instance_id, provider)
        else:
            trio.run(finish, db, instance_id)
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
