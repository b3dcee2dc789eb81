"""OpenTelemetry spans of the local Python API: the official SDK's spans, by name and shape.

An SDK worker traces what it runs; orchestrations run in this process have no SDK, so this module
emits the same spans with the same names and attributes: `create_orchestration:NAME` (the
client's start), `orchestration:NAME` (the whole run, emitted once when it ends, from the start
of its first step), `activity:NAME` (the call, from the orchestration, and the run, around the
activity's code), `orchestration:NAME:timer`, `orchestration:CHILD` (a sub-orchestration's
call) and `orchestration_event:NAME` (events raised). The trace context travels as the SDK's
does: the start carries the client's span, each call the context of its own span, and the
orchestration's span id and start time are kept between steps (and restarts) in the instance's
OrchestrationTraceContext.

Only opentelemetry-api is used, and only once the application has imported it and set a tracer
provider: until then every entry point returns after one check, and nothing of OpenTelemetry is
imported here. The orchestration's span and the calls'
spans are emitted after their children, which name them as parents: their ids are chosen first,
which needs the provider to be the OpenTelemetry SDK's (its tracers have an `id_generator`).
With another provider those spans are left out and the rest hang under the client's span, as
the official SDK does.
"""

from __future__ import annotations

import contextvars
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from dt_trio._local._replay import Step
from dt_trio._proto import orchestrator_service_pb2 as pb

SCOPE = "dt_trio"
# Attribute keys and values as the Durable Task SDKs write them.
TYPE = "durabletask.type"
NAME = "durabletask.task.name"
VERSION = "durabletask.task.version"
INSTANCE_ID = "durabletask.task.instance_id"
TASK_ID = "durabletask.task.task_id"
STATUS = "durabletask.task.status"
FIRE_AT = "durabletask.fire_at"
TARGET = "durabletask.event.target_instance_id"

# The span id the SDK tracer's id generator hands out next in this context (see `_PresetIds`).
_PRESET: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "dt_trio_span_id", default=None
)
_CALLS = ("taskScheduled", "subOrchestrationInstanceCreated", "timerCreated")
_RESULTS = {
    "taskCompleted": "taskScheduledId",
    "taskFailed": "taskScheduledId",
    "subOrchestrationInstanceCompleted": "taskScheduledId",
    "subOrchestrationInstanceFailed": "taskScheduledId",
    "timerFired": "timerId",
}


class TracedStep(Step, Protocol):
    """A step whose spans are made: its events, and the span of the execution they belong to."""

    @property
    def trace_context(self) -> pb.OrchestrationTraceContext | None: ...


def _tracer() -> Any:
    """The tracer, or None while no tracer provider is set: the whole cost of tracing when it
    is off (under a microsecond)."""
    api = sys.modules.get("opentelemetry.trace")
    if api is None:
        return None  # never imported: no tracer provider can have been set
    provider = api.get_tracer_provider()
    if isinstance(provider, api.ProxyTracerProvider | api.NoOpTracerProvider):
        return None
    return provider.get_tracer(SCOPE)


def _api() -> Any:
    """opentelemetry.trace, once `_tracer` found a provider (so it is imported)."""
    return sys.modules["opentelemetry.trace"]


class _PresetIds:
    """An SDK tracer's id generator that hands out the span id preset in this context (for a
    span whose children already name it) and asks the generator it wraps otherwise."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def generate_span_id(self) -> int:
        preset = _PRESET.get()
        return preset if preset is not None else int(self.inner.generate_span_id())

    def generate_trace_id(self) -> int:
        return int(self.inner.generate_trace_id())

    def is_trace_id_random(self) -> bool:
        return bool(getattr(self.inner, "is_trace_id_random", lambda: False)())


def _presettable(tracer: Any) -> bool:
    generator = getattr(tracer, "id_generator", None)
    if generator is None:
        return False  # not the OpenTelemetry SDK's tracer
    if not isinstance(generator, _PresetIds):
        tracer.id_generator = _PresetIds(generator)
    return True


def _start_with_id(tracer: Any, name: str, span_id: int, **options: Any) -> Any:
    token = _PRESET.set(span_id)
    try:
        return tracer.start_span(name, **options)
    finally:
        _PRESET.reset(token)


def _new_span_id() -> int:
    return random.getrandbits(64) or 1


def _parse(traceparent: str) -> tuple[int, int, int] | None:
    """(trace id, span id, flags) of a W3C traceparent, None if it is not one."""
    parts = traceparent.split("-")
    if len(parts) < 4:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    return (trace_id, span_id, flags) if trace_id and span_id else None


def _with_span(context: pb.TraceContext, span_id: int) -> pb.TraceContext:
    """`context`'s trace (and state) with another span."""
    parsed = _parse(context.traceParent)
    assert parsed is not None
    trace_id, _, flags = parsed
    other = pb.TraceContext(traceParent=f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}")
    other.spanID = f"{span_id:016x}"
    if context.HasField("traceState"):
        other.traceState.CopyFrom(context.traceState)
    return other


def _otel_context(context: pb.TraceContext | None) -> Any:
    """An OpenTelemetry Context whose current span is `context`'s (empty: a root)."""
    from opentelemetry.context import Context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if context is None or _parse(context.traceParent) is None:
        return Context()
    carrier = {"traceparent": context.traceParent}
    if context.HasField("traceState") and context.traceState.value:
        carrier["tracestate"] = context.traceState.value
    return TraceContextTextMapPropagator().extract(carrier, context=Context())


def _proto_context(span: Any) -> pb.TraceContext | None:
    found = span.get_span_context()
    if not found.is_valid:
        return None
    context = pb.TraceContext(
        traceParent=f"00-{found.trace_id:032x}-{found.span_id:016x}-{int(found.trace_flags):02x}"
    )
    context.spanID = f"{found.span_id:016x}"
    if found.trace_state:
        context.traceState.value = found.trace_state.to_header()
    return context


def _span_name(kind: str, name: str, version: str | None) -> str:
    return f"{kind}:{name}@({version})" if version else f"{kind}:{name}"


def _attributes(
    kind: str, name: str, instance_id: str, version: str | None = None
) -> dict[str, str]:
    attributes = {TYPE: kind, NAME: name, INSTANCE_ID: instance_id}
    if version:
        attributes[VERSION] = version
    return attributes


def _failed(span: Any, message: str) -> None:
    api = _api()
    span.set_status(api.Status(api.StatusCode.ERROR, message))


# -- the client ---------------------------------------------------------------------------------


@contextmanager
def create_span(
    name: str, instance_id: str, version: str | None
) -> Iterator[pb.TraceContext | None]:
    """The client's span for starting an orchestration; yields the context the start carries."""
    tracer = _tracer()
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(
        _span_name("create_orchestration", name, version),
        kind=_api().SpanKind.PRODUCER,
        attributes=_attributes("orchestration", name, instance_id, version),
    ) as span:
        yield _proto_context(span)


def event_span(event: str, target_instance_id: str, under: pb.TraceContext | None = None) -> None:
    """An event raised to an instance (by a client, or by an orchestration: `under` it)."""
    tracer = _tracer()
    if tracer is None:
        return
    attributes = {TYPE: "event", NAME: event, TARGET: target_instance_id}
    tracer.start_span(
        f"orchestration_event:{event}",
        context=_otel_context(under) if under is not None else None,
        kind=_api().SpanKind.PRODUCER,
        attributes=attributes,
    ).end()


# -- activities -----------------------------------------------------------------------------


@contextmanager
def activity_span(request: pb.ActivityRequest) -> Iterator[Any]:
    """The span of an activity's run, current while its code runs (its own spans nest under
    it), under its call's span. Yields it (None when tracing is off) for `failed`."""
    tracer = _tracer()
    if tracer is None:
        yield None
        return
    instance_id = request.orchestrationInstance.instanceId
    attributes = _attributes("activity", request.name, instance_id)
    attributes[TASK_ID] = str(request.taskId)
    span = tracer.start_span(
        _span_name("activity", request.name, None),
        context=_otel_context(
            request.parentTraceContext if request.HasField("parentTraceContext") else None
        ),
        kind=_api().SpanKind.SERVER,
        attributes=attributes,
    )
    with _api().use_span(span, end_on_exit=True):
        yield span


def activity_failed(span: Any, exc: BaseException) -> None:
    if span is not None:
        span.record_exception(exc)
        _failed(span, str(exc))


# -- orchestrations -------------------------------------------------------------------------


def trace_step(step: TracedStep, response: pb.OrchestratorResponse) -> None:
    """What the SDK does around a step, for a step run here: the context each new call carries,
    the spans of the calls whose results this step brought, the orchestration's span when it
    ends, and the span id and start kept for the next step (in `response`)."""
    tracer = _tracer()
    if tracer is None:
        return
    started = _execution_started(step)
    if started is None:
        return
    name = started.name
    version = started.version.value if started.HasField("version") else None
    parent = started.parentTraceContext if _parse(started.parentTraceContext.traceParent) else None
    kept = step.trace_context
    if kept is not None and kept.HasField("spanStartTime"):
        start_ns = kept.spanStartTime.ToNanoseconds()
    else:
        start_ns = time.time_ns()
    own: pb.TraceContext | None = None  # the orchestration span's context, id chosen up front
    if parent is not None and _presettable(tracer):
        span_id = _kept_span_id(kept) or _new_span_id()
        own = _with_span(parent, span_id)
    under = own or parent

    complete = None
    for action in response.actions:
        kind = action.WhichOneof("orchestratorActionType")
        if kind in ("scheduleTask", "createSubOrchestration") and under is not None:
            call = getattr(action, kind)
            context = _with_span(under, _new_span_id()) if own is not None else under
            call.parentTraceContext.CopyFrom(context)
        elif kind == "sendEvent":
            event_span(action.sendEvent.name, action.sendEvent.instance.instanceId, under)
        elif kind == "completeOrchestration":
            complete = action.completeOrchestration
    _results(tracer, step, name, own, under)
    if complete is not None:
        _orchestration_span(
            tracer, step.instance_id, name, version, parent, own, start_ns, complete
        )
    response.orchestrationTraceContext.spanStartTime.FromNanoseconds(start_ns)
    if own is not None:
        response.orchestrationTraceContext.spanID.value = own.spanID


def _execution_started(step: TracedStep) -> pb.ExecutionStartedEvent | None:
    for events in (step.past_events, step.new_events):
        for event in events[:3]:  # it follows the step's OrchestratorStarted
            if event.HasField("executionStarted"):
                return event.executionStarted
    return None


def _kept_span_id(kept: pb.OrchestrationTraceContext | None) -> int | None:
    if kept is None or not kept.HasField("spanID"):
        return None
    try:
        return int(kept.spanID.value, 16) or None
    except ValueError:
        return None


def _results(
    tracer: Any, step: TracedStep, name: str, own: pb.TraceContext | None, under: Any
) -> None:
    """The spans of the calls this step's new events answer: an activity's or a child's call
    (from its scheduling to its result) and a timer (from its creation to its firing)."""
    answered: dict[int, pb.HistoryEvent] = {}
    for event in step.new_events:
        kind = event.WhichOneof("eventType")
        if kind in _RESULTS:
            answered[getattr(getattr(event, kind), _RESULTS[kind])] = event
    if not answered:
        return
    for call in step.past_events:
        result = answered.get(call.eventId)
        kind = call.WhichOneof("eventType")
        if result is None or kind not in _CALLS:
            continue
        end_ns = result.timestamp.ToNanoseconds()
        if kind == "timerCreated":
            attributes = _attributes("timer", name, step.instance_id)
            attributes[TASK_ID] = str(call.eventId)
            attributes[FIRE_AT] = call.timerCreated.fireAt.ToDatetime().isoformat()
            tracer.start_span(
                f"orchestration:{name}:timer",
                context=_otel_context(under),
                kind=_api().SpanKind.INTERNAL,
                attributes=attributes,
                start_time=call.timestamp.ToNanoseconds(),
            ).end(end_ns)
            continue
        _call_span(tracer, step.instance_id, call, result, own, end_ns)


def _call_span(
    tracer: Any,
    instance_id: str,
    call: pb.HistoryEvent,
    result: pb.HistoryEvent,
    own: pb.TraceContext | None,
    end_ns: int,
) -> None:
    details: Any = (
        call.taskScheduled
        if call.HasField("taskScheduled")
        else call.subOrchestrationInstanceCreated
    )
    parsed = _parse(details.parentTraceContext.traceParent)
    if own is None or parsed is None:
        return  # its children hang under the orchestration: no call span between
    if call.HasField("taskScheduled"):
        kind, target = "activity", instance_id
    else:
        kind, target = "orchestration", details.instanceId
    version = details.version.value if details.HasField("version") else None
    attributes = _attributes(kind, details.name, target, version)
    attributes[TASK_ID] = str(call.eventId)
    span = _start_with_id(
        tracer,
        _span_name(kind, details.name, version),
        parsed[1],
        context=_otel_context(own),
        kind=_api().SpanKind.CLIENT,
        attributes=attributes,
        start_time=call.timestamp.ToNanoseconds(),
    )
    outcome = result.WhichOneof("eventType")
    if outcome in ("taskFailed", "subOrchestrationInstanceFailed"):
        _failed(span, getattr(result, outcome).failureDetails.errorMessage)
    span.end(end_ns)


def _orchestration_span(
    tracer: Any,
    instance_id: str,
    name: str,
    version: str | None,
    parent: pb.TraceContext | None,
    own: pb.TraceContext | None,
    start_ns: int,
    complete: pb.CompleteOrchestrationAction,
) -> None:
    failed = complete.orchestrationStatus == pb.ORCHESTRATION_STATUS_FAILED
    attributes = _attributes("orchestration", name, instance_id, version)
    attributes[STATUS] = "Failed" if failed else "Completed"
    options: dict[str, Any] = dict(
        context=_otel_context(parent),
        kind=_api().SpanKind.SERVER,
        attributes=attributes,
        start_time=start_ns,
    )
    span_name = _span_name("orchestration", name, version)
    if own is not None:
        span = _start_with_id(tracer, span_name, int(own.spanID, 16), **options)
    else:
        span = tracer.start_span(span_name, **options)
    if failed:
        _failed(span, complete.failureDetails.errorMessage)
    span.end()
