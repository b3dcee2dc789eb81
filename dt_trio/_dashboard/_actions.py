"""What the dashboard's buttons do, on one instance or on many (a selection, or every
instance matching a filter), through the same HubClient the gRPC service uses."""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import trio

from dt_trio._core import InstanceState, Status
from dt_trio._engine import HubClient
from dt_trio._errors import DtTrioError, InstanceNotFound, InvalidRequest
from dt_trio._log import get_logger
from dt_trio._store import InstanceFilter

log = get_logger(__name__)

# Instances acted on at once in a bulk action (their writes share the store's group commits).
BULK_CONCURRENCY = 16
BULK_PAGE = 500


class Action(enum.Enum):
    TERMINATE = "terminate"
    SUSPEND = "suspend"
    RESUME = "resume"
    RESTART = "restart"
    PURGE = "purge"
    REWIND = "rewind"
    RAISE_EVENT = "raise-event"

    @classmethod
    def parse(cls, value: object) -> Action:
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(a.value for a in cls)
            raise InvalidRequest(f"action '{str(value)[:50]}' is none of {known}") from None


BULK_ACTIONS = (Action.TERMINATE, Action.SUSPEND, Action.RESUME, Action.RESTART, Action.PURGE)

# Which instances an action applies to; the others are skipped by bulk actions and refused
# (by the engine) for one instance.
APPLIES: dict[Action, Callable[[InstanceState], bool]] = {
    Action.TERMINATE: lambda s: not s.status.is_terminal,
    Action.SUSPEND: lambda s: s.status in (Status.RUNNING, Status.PENDING),
    Action.RESUME: lambda s: s.status == Status.SUSPENDED,
    Action.RESTART: lambda s: s.status.is_terminal,
    Action.PURGE: lambda s: s.status.is_terminal,
    Action.REWIND: lambda s: s.status == Status.FAILED,
    Action.RAISE_EVENT: lambda s: not s.status.is_terminal,
}


def _text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a string")
    return value


def _json_text(body: dict[str, Any], key: str) -> str | None:
    """A payload given as JSON text (what the SDKs store): checked, passed on as it is."""
    value = _text(body, key)
    if value is not None:
        try:
            json.loads(value)
        except ValueError as exc:
            raise InvalidRequest(f'{key} is not JSON ({exc}); quote a string: "text"') from None
    return value


@dataclass(frozen=True)
class Done:
    instance_id: str  # the instance acted on (a restart with a new id: the new one)
    changed: bool  # False: nothing to do (a purge of a running instance, say)


async def act(client: HubClient, instance_id: str, action: Action, body: dict[str, Any]) -> Done:
    """Do `action` on one instance; `body` carries its options (reason, event name and
    data, newInstanceId for a restart)."""
    reason = _text(body, "reason")
    if action is Action.TERMINATE:
        await client.terminate(instance_id, _json_text(body, "output"), recursive=True)
    elif action is Action.SUSPEND:
        await client.suspend(instance_id, reason)
    elif action is Action.RESUME:
        await client.resume(instance_id, reason)
    elif action is Action.REWIND:
        await client.rewind(instance_id, reason)
    elif action is Action.RAISE_EVENT:
        name = _text(body, "name")
        if name is None:
            raise InvalidRequest("name (the event name) is required and must not be empty")
        await client.raise_event(instance_id, name, _json_text(body, "data"))
    elif action is Action.RESTART:
        new_id = await client.restart(instance_id, bool(body.get("newInstanceId")))
        return Done(new_id, True)
    elif action is Action.PURGE:
        if await client.store.get_instance(instance_id) is None:
            raise InstanceNotFound(instance_id)
        deleted = await client.store.purge(instance_id, recursive=False)
        return Done(instance_id, deleted > 0)
    return Done(instance_id, True)


@dataclass(frozen=True)
class BulkResult:
    matched: int  # instances selected or matching the filter
    done: int  # acted on
    skipped: int  # the action does not apply to their status (or they are gone)
    errors: list[str]


async def _each(
    client: HubClient, action: Action, states: Sequence[InstanceState]
) -> tuple[int, list[str]]:
    done = 0
    errors: list[str] = []
    limiter = trio.CapacityLimiter(BULK_CONCURRENCY)

    async def one(state: InstanceState) -> None:
        nonlocal done
        async with limiter:
            try:
                if (await act(client, state.instance_id, action, {})).changed:
                    done += 1
            except DtTrioError as exc:
                errors.append(f"{state.instance_id}: {exc}")

    async with trio.open_nursery() as nursery:
        for state in states:
            nursery.start_soon(one, state)
    return done, errors


async def bulk(
    client: HubClient,
    action: Action,
    ids: Sequence[str] | None,
    where: InstanceFilter | None,
) -> BulkResult:
    """Do `action` on every instance in `ids`, or on every instance matching `where` that
    exists now (instances created after the request are left alone)."""
    if action not in BULK_ACTIONS:
        raise InvalidRequest(f"{action.value} is not a bulk action")
    matched = done = skipped = 0
    errors: list[str] = []

    async def process(page: Sequence[InstanceState]) -> None:
        nonlocal done, skipped, errors
        applicable = [s for s in page if APPLIES[action](s)]
        count, failed = await _each(client, action, applicable)
        done += count
        skipped += len(page) - count - len(failed)
        errors += failed

    if ids is not None:
        states = []
        for instance_id in ids:
            state = await client.store.get_instance(instance_id)
            if state is not None:
                states.append(state)
        matched, skipped = len(ids), len(ids) - len(states)
        await process(states)
    else:
        assert where is not None
        now = datetime.now(UTC)
        if where.created_to is None or where.created_to > now:
            where = replace(where, created_to=now)
        after = None
        while True:
            page, after = await client.store.query_instances(where, BULK_PAGE, after)
            matched += len(page)
            await process(page)
            if after is None:
                break
    log.info("%s of %d instances from the dashboard: %d done", action.value, matched, done)
    return BulkResult(matched, done, skipped, errors[:20])
