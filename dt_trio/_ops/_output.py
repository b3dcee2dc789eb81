"""What the operator commands print: records as an aligned table, one JSON document, or JSON
lines; and the records made from the protocol's messages.

A record is a JSON-ready dict whose keys are the protocol's field names; statuses are bare
names (RUNNING), times RFC 3339 in UTC, and payloads (input, output, custom status, entity
state) are shown as JSON when they parse as JSON, else as their text.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from dt_trio._proto import orchestrator_service_pb2 as pb

Record = dict[str, Any]

# Table cells of payloads and event details are cut to this many characters.
CELL_WIDTH = 60


@dataclass(frozen=True)
class Column:
    """One column of a table: the record's key, its heading, and how a value is shown."""

    key: str
    heading: str
    show: Callable[[Any], str] | None = None


@dataclass(frozen=True)
class Listing:
    """Many records: a table with a row each, a JSON array, or a JSON line each."""

    records: Sequence[Record]
    columns: Sequence[Column]


@dataclass(frozen=True)
class Detail:
    """One record: a table of its fields, a JSON object, or one JSON line."""

    record: Record


def emit(shown: Listing | Detail, output: str, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    if output == "json":
        value = shown.record if isinstance(shown, Detail) else list(shown.records)
        out.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    elif output == "jsonl":
        for record in [shown.record] if isinstance(shown, Detail) else shown.records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    elif isinstance(shown, Detail):
        rows = [[key, cell(value)] for key, value in shown.record.items()]
        out.write(_aligned(rows))
    else:
        rows = [[column.heading for column in shown.columns]]
        for record in shown.records:
            rows.append([(column.show or cell)(record.get(column.key)) for column in shown.columns])
        out.write(_aligned(rows))
    out.flush()


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "".join(line.rstrip() + "\n" for line in lines)


_CONTROL = {i: f"\\x{i:02x}" for i in range(32)} | {9: "\\t", 10: "\\n", 13: "\\r", 127: "\\x7f"}


def cell(value: Any) -> str:
    """A value on one line of a table: text as it is (control characters escaped), anything
    else as compact JSON, a missing value as '-'."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.translate(_CONTROL)


def short(value: Any) -> str:
    """A cell cut to CELL_WIDTH characters."""
    text = cell(value)
    return text if len(text) <= CELL_WIDTH else text[: CELL_WIDTH - 1] + "…"


def seconds(value: Any) -> str:
    """An RFC 3339 time to the second, for tables."""
    if not isinstance(value, str):
        return cell(value)
    whole, dot, _ = value.partition(".")
    return whole + "Z" if dot else value


def payload(text: str | None) -> Any:
    """A payload as the JSON value it holds, or as its text when it is not JSON."""
    if text is None:
        return None
    try:
        return json.loads(text, parse_constant=_not_json)
    except ValueError:
        return text


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _str(message: Message, field: str) -> str | None:
    return getattr(message, field).value if message.HasField(field) else None


def _time(message: Message, field: str) -> str | None:
    return getattr(message, field).ToJsonString() if message.HasField(field) else None


def status_name(value: int) -> str:
    try:
        return pb.OrchestrationStatus.Name(value).removeprefix("ORCHESTRATION_STATUS_")
    except ValueError:
        return str(value)  # a status newer than this protocol


def instance_record(state: pb.OrchestrationState, payloads: bool) -> Record:
    record: Record = {
        "instanceId": state.instanceId,
        "name": state.name,
        "orchestrationStatus": status_name(state.orchestrationStatus),
        "version": _str(state, "version"),
        "executionId": _str(state, "executionId"),
        "parentInstanceId": _str(state, "parentInstanceId"),
        "createdTimestamp": _time(state, "createdTimestamp"),
        "lastUpdatedTimestamp": _time(state, "lastUpdatedTimestamp"),
        "completedTimestamp": _time(state, "completedTimestamp"),
        "scheduledStartTimestamp": _time(state, "scheduledStartTimestamp"),
        "tags": dict(state.tags),
    }
    if payloads:
        record["input"] = payload(_str(state, "input"))
        record["output"] = payload(_str(state, "output"))
    record["customStatus"] = payload(_str(state, "customStatus"))
    record["failureDetails"] = (
        json_format.MessageToDict(state.failureDetails)
        if state.HasField("failureDetails")
        else None
    )
    return record


INSTANCE_COLUMNS = (
    Column("instanceId", "INSTANCE ID"),
    Column("name", "NAME"),
    Column("orchestrationStatus", "STATUS"),
    Column("createdTimestamp", "CREATED", seconds),
    Column("lastUpdatedTimestamp", "LAST UPDATED", seconds),
)


def event_record(event: pb.HistoryEvent) -> Record:
    """A history event in the protocol's own JSON form (json_format.ParseDict reads it back)."""
    return json_format.MessageToDict(event, always_print_fields_with_no_presence=True)


def event_row(event: pb.HistoryEvent) -> Record:
    """What a history table shows of an event: its kind, the name it carries, the rest."""
    kind = event.WhichOneof("eventType")
    details = json_format.MessageToDict(getattr(event, kind)) if kind else {}
    name = details.pop("name", None)
    return {
        "eventId": event.eventId,
        "timestamp": event.timestamp.ToJsonString(),
        "eventType": kind,
        "name": name,
        "details": " ".join(f"{key}={cell(value)}" for key, value in details.items()) or None,
    }


EVENT_COLUMNS = (
    Column("eventId", "ID"),
    Column("timestamp", "TIME", seconds),
    Column("eventType", "EVENT"),
    Column("name", "NAME"),
    Column("details", "DETAILS", short),
)


def entity_record(entity: pb.EntityMetadata) -> Record:
    return {
        "instanceId": entity.instanceId,
        "lastModifiedTime": _time(entity, "lastModifiedTime"),
        "backlogQueueSize": entity.backlogQueueSize,
        "lockedBy": _str(entity, "lockedBy"),
        "serializedState": payload(_str(entity, "serializedState")),
    }


ENTITY_COLUMNS = (
    Column("instanceId", "ENTITY ID"),
    Column("lastModifiedTime", "LAST MODIFIED", seconds),
    Column("lockedBy", "LOCKED BY"),
    Column("backlogQueueSize", "BACKLOG"),
    Column("serializedState", "STATE", short),
)

RESULT_COLUMNS = (Column("instanceId", "INSTANCE ID"), Column("result", "RESULT"))
