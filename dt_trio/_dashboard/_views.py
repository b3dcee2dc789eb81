"""The dashboard's queries as URLs give them, and instances and entities as the pages and the
JSON API show them (pure: no I/O)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from google.protobuf import json_format

from dt_trio._core import EntityState, InstanceState, Status
from dt_trio._errors import InvalidRequest
from dt_trio._proto import orchestrator_service_pb2 as pb
from dt_trio._store import InstanceFilter, PageKey

PAGE_SIZE = 50
# Payloads bigger than this are cut in the pages (the JSON API gives them whole).
SHOWN_PAYLOAD_CHARS = 256 * 1024

Params = Mapping[str, Sequence[str]]


def iso(dt: datetime | None) -> str | None:
    """A time for the JSON API: ISO 8601 in UTC with a Z."""
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def shown_time(dt: datetime | None) -> str:
    """A time for the pages: UTC to the millisecond."""
    if dt is None:
        return ""
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def pretty(text: str | None) -> str:
    """A payload as indented JSON when it is JSON, else as it is; cut past
    SHOWN_PAYLOAD_CHARS."""
    if text is None:
        return ""
    if len(text) > SHOWN_PAYLOAD_CHARS:
        return text[:SHOWN_PAYLOAD_CHARS] + f"\n… ({len(text):,} characters; see the JSON API)"
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


def _one(params: Params, key: str) -> str | None:
    values = params.get(key) or []
    value = values[-1].strip() if values else ""
    return value or None


def parse_time(value: str | None, key: str) -> datetime | None:
    """An ISO 8601 time from a URL or a request; without a zone it is UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"{key} '{value[:50]}' is not a time: give ISO 8601, e.g. 2026-01-31T12:00"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def page_token(key: PageKey) -> str:
    return f"{key[0]}:{key[1]}"


def parse_page_token(value: str | None, key: str) -> PageKey | None:
    if value is None:
        return None
    position, sep, instance_id = value.partition(":")
    if not sep or not position.isdigit() or not instance_id:
        raise InvalidRequest(f"{key} '{value[:100]}' is not a page position of this dashboard")
    return int(position), instance_id


def parse_statuses(values: Sequence[str]) -> frozenset[Status]:
    statuses = set()
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                statuses.add(Status[part.strip().upper()])
            except KeyError:
                known = ", ".join(s.name for s in Status)
                raise InvalidRequest(f"status '{part[:50]}' is none of {known}") from None
    return frozenset(statuses)


@dataclass(frozen=True)
class InstanceQuery:
    """The instance list's filters and page, as the URL keeps them (deep links)."""

    statuses: frozenset[Status] = frozenset()
    name: str | None = None
    prefix: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    after: PageKey | None = None  # the next page: rows older than this one
    before: PageKey | None = None  # the previous page: rows newer than this one

    @classmethod
    def parse(cls, params: Params) -> InstanceQuery:
        """From URL parameters: status (repeated or comma-separated), name, prefix,
        created_after, created_before, after, before. Bad values raise InvalidRequest."""
        return cls(
            statuses=parse_statuses(params.get("status") or []),
            name=_one(params, "name"),
            prefix=_one(params, "prefix"),
            created_after=parse_time(_one(params, "created_after"), "created_after"),
            created_before=parse_time(_one(params, "created_before"), "created_before"),
            after=parse_page_token(_one(params, "after"), "after"),
            before=parse_page_token(_one(params, "before"), "before"),
        )

    def where(self, *, with_statuses: bool = True) -> InstanceFilter:
        return InstanceFilter(
            statuses=self.statuses if self.statuses and with_statuses else None,
            created_from=self.created_after,
            created_to=self.created_before,
            id_prefix=self.prefix,
            name=self.name,
        )

    def params(self) -> list[tuple[str, str]]:
        out = [("status", s.name.lower()) for s in sorted(self.statuses)]
        for key, value in (
            ("name", self.name),
            ("prefix", self.prefix),
            ("created_after", time_param(self.created_after)),
            ("created_before", time_param(self.created_before)),
            ("after", page_token(self.after) if self.after else None),
            ("before", page_token(self.before) if self.before else None),
        ):
            if value is not None:
                out.append((key, value))
        return out

    def url(self, path: str = "/instances", **changes: Any) -> str:
        query = urlencode(replace(self, **changes).params())
        return f"{path}?{query}" if query else path

    def filter_json(self) -> dict[str, Any]:
        """The filter (without the page) as the bulk API takes it."""
        params: dict[str, Any] = {}
        for key, value in replace(self, after=None, before=None).params():
            if key == "status":
                params.setdefault("status", []).append(value)
            else:
                params[key] = value
        return params


def time_param(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    text = dt.astimezone(UTC).replace(tzinfo=None).isoformat()
    return text[:-3] if text.endswith(":00") and len(text) == 19 else text


def query_from_json(filter_: object) -> InstanceQuery:
    """The bulk API's `filter`: an object with the URL's keys (values strings, `status` also
    a list)."""
    if not isinstance(filter_, dict):
        raise InvalidRequest("filter must be an object with the instance list's URL keys")
    params: dict[str, list[str]] = {}
    for key, value in filter_.items():
        if key not in ("status", "name", "prefix", "created_after", "created_before"):
            raise InvalidRequest(f"filter has an unknown key '{str(key)[:50]}'")
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in values):
            raise InvalidRequest(f"filter.{key} must be a string or a list of strings")
        params[key] = values
    return InstanceQuery.parse(params)


@dataclass(frozen=True)
class InstancePage:
    """One page of the instance list, newest first, and the counts per status."""

    query: InstanceQuery
    instances: list[InstanceState]
    counts: dict[Status, int]
    newer: PageKey | None  # where the previous page starts, None on the first page
    older: PageKey | None  # where the next page starts, None on the last page
    matching: int = field(init=False)

    def __post_init__(self) -> None:
        wanted = self.query.statuses or frozenset(Status)
        object.__setattr__(self, "matching", sum(n for s, n in self.counts.items() if s in wanted))


def failure_json(details: pb.TaskFailureDetails | None) -> dict[str, Any] | None:
    if details is None:
        return None
    return json_format.MessageToDict(details)


def instance_json(state: InstanceState, payloads: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "instanceId": state.instance_id,
        "name": state.name,
        "status": state.status.name,
        "version": state.version,
        "executionId": state.execution_id,
        "createdAt": iso(state.created_at),
        "lastUpdatedAt": iso(state.last_updated_at),
        "completedAt": iso(state.completed_at),
        "scheduledStartAt": iso(state.scheduled_start_at),
        "parentInstanceId": state.parent_instance_id,
        "tags": dict(state.tags),
        "customStatus": state.custom_status,
    }
    if payloads:
        out["input"] = state.input
        out["output"] = state.output
        out["failure"] = failure_json(state.failure)
    return out


def counts_json(counts: Mapping[Status, int]) -> dict[str, int]:
    return {s.name: counts.get(s, 0) for s in Status}


def event_json(event: pb.HistoryEvent) -> dict[str, Any]:
    """A history event in the protocol's JSON form (as StreamInstanceHistory gives it)."""
    return json_format.MessageToDict(event)


def entity_json(entity: EntityState) -> dict[str, Any]:
    return {
        "entityId": entity.instance_id,
        "state": entity.state,
        "lastModifiedAt": iso(entity.last_modified_at),
        "lockedBy": entity.locked_by,
        "lockOwner": entity.lock_owner,
        "queueLength": entity.backlog,
    }


def children_of(history: Sequence[pb.HistoryEvent]) -> list[str]:
    """The ids of the sub-orchestrations the history started, in order."""
    return [
        e.subOrchestrationInstanceCreated.instanceId
        for e in history
        if e.HasField("subOrchestrationInstanceCreated")
    ]


@dataclass(frozen=True)
class EntityQuery:
    prefix: str | None = None
    after: str | None = None

    @classmethod
    def parse(cls, params: Params) -> EntityQuery:
        return cls(prefix=_one(params, "prefix"), after=_one(params, "after"))

    def url(self, **changes: Any) -> str:
        moved = replace(self, **changes)
        query = urlencode(
            [(k, v) for k, v in (("prefix", moved.prefix), ("after", moved.after)) if v]
        )
        return f"/entities?{query}" if query else "/entities"
