"""What the dashboard shows of a history: table rows and the timeline, computed from the
events alone (pure functions, no I/O)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from dt_trio._core import Status
from dt_trio._core import _events as ev
from dt_trio._proto import orchestrator_service_pb2 as pb

DETAIL_CHARS = 200


class EventFilter(enum.Enum):
    """Which rows of a history the table shows."""

    ALL = "all"
    FAILED = "failed"
    PENDING = "pending"


class BarKind(enum.Enum):
    ACTIVITY = "activity"
    TIMER = "timer"
    SUB_ORCHESTRATION = "sub-orchestration"
    ENTITY_CALL = "entity-call"


# The event that schedules each kind of bar, and the field of the events that end it which
# names the scheduling event (by eventId, or for entity calls by requestId).
_OPENERS = {
    "taskScheduled": BarKind.ACTIVITY,
    "timerCreated": BarKind.TIMER,
    "subOrchestrationInstanceCreated": BarKind.SUB_ORCHESTRATION,
    "entityOperationCalled": BarKind.ENTITY_CALL,
}
_CLOSERS = {
    "taskCompleted": "taskScheduledId",
    "taskFailed": "taskScheduledId",
    "timerFired": "timerId",
    "subOrchestrationInstanceCompleted": "taskScheduledId",
    "subOrchestrationInstanceFailed": "taskScheduledId",
    "entityOperationCompleted": "requestId",
    "entityOperationFailed": "requestId",
}
_FAILURES = frozenset({"taskFailed", "subOrchestrationInstanceFailed", "entityOperationFailed"})
# Events drawn as marks on the timeline.
_MARKS = frozenset(
    {
        "executionStarted",
        "executionCompleted",
        "executionTerminated",
        "executionSuspended",
        "executionResumed",
        "executionRewound",
        "eventRaised",
        "eventSent",
        "entityOperationSignaled",
        "continueAsNew",
    }
)


def kind_of(event: pb.HistoryEvent) -> str:
    """The event's type as the protocol names it in its oneof, e.g. "taskScheduled"."""
    return event.WhichOneof("eventType") or "unknown"


def title(kind: str) -> str:
    """ "taskScheduled" -> "TaskScheduled", as the SDKs name event types."""
    return kind[:1].upper() + kind[1:]


def _key(event: pb.HistoryEvent, kind: str) -> tuple[str, object]:
    """What pairs an opening event with the event that ends it."""
    if kind == "entityOperationCalled":
        return "request", event.entityOperationCalled.requestId
    if kind in _OPENERS:
        return "event", event.eventId
    field = _CLOSERS[kind]
    value = getattr(getattr(event, kind), field)
    return ("request" if field == "requestId" else "event"), value


def status_name(value: int) -> str:
    try:
        return Status(value).name
    except ValueError:
        return str(value)


def _short(text: str | None) -> str:
    if text is None:
        return ""
    text = text.strip()
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 1] + "…"


def _failure_text(details: pb.TaskFailureDetails) -> str:
    return (
        f"{details.errorType}: {details.errorMessage}"
        if details.errorType
        else details.errorMessage
    )


@dataclass(frozen=True)
class Row:
    """One history event as the table shows it."""

    index: int
    event_id: int
    at: datetime
    elapsed: float  # seconds since the history's earliest event
    kind: str
    name: str
    details: str
    failed: bool
    pending: bool


# Events shown as a field of theirs for the name (none: no name) and one for the details.
_NAME_AND_DETAILS = {
    "executionStarted": ("name", "input"),
    "taskScheduled": ("name", "input"),
    "eventRaised": ("name", "input"),
    "executionTerminated": (None, "input"),
    "executionSuspended": (None, "input"),
    "executionResumed": (None, "input"),
    "executionRewound": (None, "reason"),
    "continueAsNew": (None, "input"),
}


def _name_and_details(
    event: pb.HistoryEvent, kind: str, names: dict[tuple[str, object], str]
) -> tuple[str, str]:
    fields = _NAME_AND_DETAILS.get(kind)
    if fields is not None:
        payload = getattr(event, kind)
        name, details = fields
        return getattr(payload, name) if name else "", _short(ev.opt_str(payload, details))
    if kind == "executionCompleted":
        c = event.executionCompleted
        status = status_name(c.orchestrationStatus)
        if c.HasField("failureDetails"):
            return status, _short(_failure_text(c.failureDetails))
        return status, _short(ev.opt_str(c, "result"))
    if kind == "subOrchestrationInstanceCreated":
        created = event.subOrchestrationInstanceCreated
        return created.name, _short(f"{created.instanceId} {ev.opt_str(created, 'input') or ''}")
    if kind == "timerCreated":
        return "", "fires at " + ev.to_datetime(event.timerCreated.fireAt).isoformat()
    if kind in ("entityOperationCalled", "entityOperationSignaled"):
        operation = getattr(event, kind)
        target = ev.opt_str(operation, "targetInstanceId") or ""
        return operation.operation, _short(f"{target} {ev.opt_str(operation, 'input') or ''}")
    if kind in _CLOSERS:
        name = names.get(_key(event, kind), "")
        payload = getattr(event, kind)
        if kind in _FAILURES:
            return name, _short(_failure_text(payload.failureDetails))
        if kind == "timerFired":
            return name, "fired for " + ev.to_datetime(payload.fireAt).isoformat()
        field = "output" if kind == "entityOperationCompleted" else "result"
        return name, _short(ev.opt_str(payload, field))
    if kind == "eventSent":
        sent = event.eventSent
        return sent.name, _short(f"to {sent.instanceId} {ev.opt_str(sent, 'input') or ''}")
    return "", ""


def rows(history: Sequence[pb.HistoryEvent], start: int = 0) -> list[Row]:
    """The table rows of `history[start:]` (names and pending marks from the whole history)."""
    names: dict[tuple[str, object], str] = {}
    closed: set[tuple[str, object]] = set()
    for event in history:
        kind = kind_of(event)
        if kind in _OPENERS:
            names[_key(event, kind)] = _name_and_details(event, kind, names)[0] or title(kind)
        elif kind in _CLOSERS:
            closed.add(_key(event, kind))
    # The earliest time: a step's ExecutionStarted may be stamped before its OrchestratorStarted.
    origin = min((ev.to_datetime(e.timestamp) for e in history), default=None)
    out = []
    for index in range(start, len(history)):
        event = history[index]
        kind = kind_of(event)
        at = ev.to_datetime(event.timestamp)
        name, details = _name_and_details(event, kind, names)
        failed = kind in _FAILURES or (
            kind == "executionCompleted"
            and int(event.executionCompleted.orchestrationStatus) == int(Status.FAILED)
        )
        out.append(
            Row(
                index=index,
                event_id=event.eventId,
                at=at,
                elapsed=(at - origin).total_seconds() if origin is not None else 0.0,
                kind=title(kind),
                name=name,
                details=details,
                failed=failed,
                pending=kind in _OPENERS and _key(event, kind) not in closed,
            )
        )
    return out


def keep(row: Row, which: EventFilter) -> bool:
    if which is EventFilter.FAILED:
        return row.failed
    if which is EventFilter.PENDING:
        return row.pending
    return True


@dataclass(frozen=True)
class Bar:
    """Something that ran from `start` to `end` (None: still running)."""

    kind: BarKind
    label: str
    start: datetime
    end: datetime | None
    failed: bool


@dataclass(frozen=True)
class Mark:
    kind: str
    label: str
    at: datetime


@dataclass(frozen=True)
class Timeline:
    bars: list[Bar]
    marks: list[Mark]


def timeline(history: Sequence[pb.HistoryEvent]) -> Timeline:
    """Activities, timers, sub-orchestrations and entity calls as bars from the event that
    scheduled them to the one that ended them; the instance's own events as marks."""
    opened: dict[tuple[str, object], int] = {}
    bars: list[Bar] = []
    marks: list[Mark] = []
    for event in history:
        kind = kind_of(event)
        at = ev.to_datetime(event.timestamp)
        if kind in _OPENERS:
            name = _name_and_details(event, kind, {})[0] or title(kind)
            opened[_key(event, kind)] = len(bars)
            bars.append(Bar(_OPENERS[kind], name, at, None, False))
        elif kind in _CLOSERS:
            position = opened.pop(_key(event, kind), None)
            if position is not None:
                bar = bars[position]
                bars[position] = Bar(bar.kind, bar.label, bar.start, at, kind in _FAILURES)
        elif kind in _MARKS:
            label = _name_and_details(event, kind, {})[0]
            marks.append(Mark(kind, f"{title(kind)} {label}".strip(), at))
    return Timeline(bars, marks)


@dataclass(frozen=True)
class Geometry:
    """A timeline laid out in a `width` x `height` box: bars as (x, y, width, bar) and marks
    as (x, mark), times as x from `left`."""

    width: int
    height: int
    left: int
    bars: list[tuple[float, float, float, Bar]]
    marks: list[tuple[float, Mark]]
    span_seconds: float
    hidden_bars: int


TIMELINE_WIDTH = 960
TIMELINE_LEFT = 180  # room for the bars' labels
TIMELINE_ROW = 18
TIMELINE_MAX_BARS = 400


def layout(line: Timeline, now: datetime) -> Geometry:
    """Where each bar and mark goes; running bars end at `now`. At most TIMELINE_MAX_BARS
    bars are drawn (the first ones); the rest are counted in `hidden_bars`."""
    times = [b.start for b in line.bars] + [m.at for m in line.marks]
    times += [b.end for b in line.bars if b.end is not None]
    if any(b.end is None for b in line.bars):
        times.append(now)
    if not times:
        return Geometry(TIMELINE_WIDTH, TIMELINE_ROW * 2, TIMELINE_LEFT, [], [], 0.0, 0)
    first, last = min(times), max(times)
    span = max((last - first).total_seconds(), 1e-3)
    usable = TIMELINE_WIDTH - TIMELINE_LEFT - 10

    def x(at: datetime) -> float:
        return round(TIMELINE_LEFT + (at - first).total_seconds() / span * usable, 1)

    shown = line.bars[:TIMELINE_MAX_BARS]
    placed = []
    for row, bar in enumerate(shown, start=1):
        start = x(bar.start)
        end = x(bar.end if bar.end is not None else now)
        placed.append((start, float(row * TIMELINE_ROW), max(end - start, 2.0), bar))
    height = (len(shown) + 2) * TIMELINE_ROW
    return Geometry(
        TIMELINE_WIDTH,
        height,
        TIMELINE_LEFT,
        placed,
        [(x(m.at), m) for m in line.marks],
        span,
        len(line.bars) - len(shown),
    )
