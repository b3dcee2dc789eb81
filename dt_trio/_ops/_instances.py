"""`dt-trio instances ...`: list, inspect, start and act on orchestration instances.

An action (terminate, suspend, ...) takes instance ids, or a filter: then the matching instances
are found first (QueryInstances, and the name compared here, as the query has no name field),
the user confirms their number, and the action runs on each of them, a few at a time.
"""

from __future__ import annotations

import argparse
import functools
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO

import trio

from dt_trio._ops._output import (
    EVENT_COLUMNS,
    INSTANCE_COLUMNS,
    RESULT_COLUMNS,
    Column,
    Detail,
    Listing,
    Record,
    emit,
    event_record,
    event_row,
    instance_record,
)
from dt_trio._ops._sidecar import Sidecar, SidecarError, run
from dt_trio._proto import orchestrator_service_pb2 as pb

# Instances asked for in one QueryInstances call.
PAGE_SIZE = 500
# An action on many instances keeps this many rpcs in flight at once.
CONCURRENCY = 16


@dataclass(frozen=True)
class Selection:
    """The instances a filter matches."""

    statuses: tuple[str, ...] = ()
    name: str | None = None
    prefix: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None

    @classmethod
    def of(cls, args: argparse.Namespace) -> Selection:
        return cls(
            tuple(dict.fromkeys(args.status or ())),
            args.name,
            args.prefix,
            args.created_after,
            args.created_before,
        )

    def __bool__(self) -> bool:
        return self != Selection()

    def describe(self) -> str:
        """The filter as the options that give it."""
        words = [f"--status {status}" for status in self.statuses]
        for option, value in (
            ("--name", self.name),
            ("--prefix", self.prefix),
            ("--created-after", self.created_after),
            ("--created-before", self.created_before),
        ):
            if value is not None:
                words.append(
                    f"{option} {value.isoformat() if isinstance(value, datetime) else value}"
                )
        return " ".join(words)

    def query(self) -> pb.InstanceQuery:
        query = pb.InstanceQuery(
            runtimeStatus=[f"ORCHESTRATION_STATUS_{status}" for status in self.statuses],
            maxInstanceCount=PAGE_SIZE,
        )
        if self.prefix is not None:
            query.instanceIdPrefix.value = self.prefix
        if self.created_after is not None:
            query.createdTimeFrom.FromDatetime(self.created_after)
        if self.created_before is not None:
            query.createdTimeTo.FromDatetime(self.created_before)
        return query


async def matching(
    sidecar: Sidecar, selection: Selection, payloads: bool = False, limit: int | None = None
) -> list[pb.OrchestrationState]:
    """The instances the selection matches, in the sidecar's order, at most `limit`."""
    query = selection.query()
    query.fetchInputsAndOutputs = payloads
    found: list[pb.OrchestrationState] = []
    while True:
        page: pb.QueryInstancesResponse = await sidecar.call(
            "QueryInstances", pb.QueryInstancesRequest(query=query)
        )
        for state in page.orchestrationState:
            if selection.name is None or state.name == selection.name:
                found.append(state)
                if limit is not None and len(found) == limit:
                    return found
        if not page.continuationToken.value:
            return found
        query.continuationToken.value = page.continuationToken.value


async def _state(
    sidecar: Sidecar, instance_id: str, rpc: str = "GetInstance"
) -> pb.OrchestrationState:
    request = pb.GetInstanceRequest(instanceId=instance_id, getInputsAndOutputs=True)
    response: pb.GetInstanceResponse = await sidecar.call(rpc, request)
    if not response.exists:
        raise SidecarError("NOT_FOUND", f"no orchestration instance with id '{instance_id}'")
    return response.orchestrationState


def list_instances(args: argparse.Namespace) -> int:
    selection = Selection.of(args)
    work = functools.partial(
        matching, selection=selection, payloads=args.payloads, limit=args.limit
    )
    states = run(args.target, work)
    records = [instance_record(state, args.payloads) for state in states]
    emit(Listing(records, INSTANCE_COLUMNS), args.output)
    return 0


def show(args: argparse.Namespace) -> int:
    state = run(args.target, functools.partial(_state, instance_id=args.instance_id))
    emit(Detail(instance_record(state, payloads=True)), args.output)
    return 0


def history(args: argparse.Namespace) -> int:
    request = pb.StreamInstanceHistoryRequest(instanceId=args.instance_id)
    chunks = run(args.target, lambda sidecar: sidecar.collect("StreamInstanceHistory", request))
    events: list[pb.HistoryEvent] = [event for chunk in chunks for event in chunk.events]
    as_record = event_row if args.output == "table" else event_record
    emit(Listing([as_record(event) for event in events], EVENT_COLUMNS), args.output)
    return 0


def start(args: argparse.Namespace) -> int:
    request = pb.CreateInstanceRequest(
        instanceId=args.instance_id or uuid.uuid4().hex, name=args.name, tags=dict(args.tag or ())
    )
    if args.input is not None:
        request.input.value = args.input
    if args.version is not None:
        request.version.value = args.version
    if args.start_at is not None:
        request.scheduledStartTimestamp.FromDatetime(args.start_at)
    response = run(args.target, lambda sidecar: sidecar.call("StartInstance", request))
    emit(Detail({"instanceId": response.instanceId, "result": "started"}), args.output)
    return 0


def wait(args: argparse.Namespace) -> int:
    rpc, until = (
        ("WaitForInstanceStart", "start") if args.start else ("WaitForInstanceCompletion", "finish")
    )

    async def waited(sidecar: Sidecar) -> pb.OrchestrationState:
        with trio.move_on_after(args.timeout or float("inf")):
            return await _state(sidecar, args.instance_id, rpc)
        raise SidecarError(
            "DEADLINE_EXCEEDED",
            f"instance '{args.instance_id}' did not {until} within {args.timeout:g} s",
        )

    emit(Detail(instance_record(run(args.target, waited), payloads=True)), args.output)
    return 0


def raise_event(args: argparse.Namespace) -> int:
    request = pb.RaiseEventRequest(instanceId=args.instance_id, name=args.event)
    if args.input is not None:
        request.input.value = args.input
    run(args.target, lambda sidecar: sidecar.call("RaiseEvent", request))
    emit(Detail({"instanceId": args.instance_id, "result": "event raised"}), args.output)
    return 0


# -- actions on one instance or many -----------------------------------------------------------

Act = Callable[[Sidecar, str, argparse.Namespace], Awaitable[Record]]


@dataclass(frozen=True)
class Action:
    """An rpc on one instance; `act` returns the record fields it adds to "result": `done`."""

    act: Act
    done: str
    columns: tuple[Column, ...] = ()


async def _terminate(sidecar: Sidecar, instance_id: str, args: argparse.Namespace) -> Record:
    request = pb.TerminateRequest(instanceId=instance_id, recursive=args.recursive)
    if args.result is not None:
        request.output.value = args.result
    await sidecar.call("TerminateInstance", request)
    return {}


def _with_reason(
    rpc: str, request_type: type[pb.SuspendRequest | pb.ResumeRequest | pb.RewindInstanceRequest]
) -> Act:
    async def act(sidecar: Sidecar, instance_id: str, args: argparse.Namespace) -> Record:
        request = request_type(instanceId=instance_id)
        if args.reason is not None:
            request.reason.value = args.reason
        await sidecar.call(rpc, request)
        return {}

    return act


async def _restart(sidecar: Sidecar, instance_id: str, args: argparse.Namespace) -> Record:
    request = pb.RestartInstanceRequest(
        instanceId=instance_id, restartWithNewInstanceId=args.new_id
    )
    response: pb.RestartInstanceResponse = await sidecar.call("RestartInstance", request)
    return {"restartedInstanceId": response.instanceId}


async def _purge(sidecar: Sidecar, instance_id: str, args: argparse.Namespace) -> Record:
    request = pb.PurgeInstancesRequest(instanceId=instance_id, recursive=args.recursive)
    response: pb.PurgeInstancesResponse = await sidecar.call("PurgeInstances", request)
    return {"deletedInstanceCount": response.deletedInstanceCount}


ACTIONS = {
    "terminate": Action(_terminate, "terminated"),
    "suspend": Action(_with_reason("SuspendInstance", pb.SuspendRequest), "suspended"),
    "resume": Action(_with_reason("ResumeInstance", pb.ResumeRequest), "resumed"),
    "rewind": Action(_with_reason("RewindInstance", pb.RewindInstanceRequest), "rewound"),
    "restart": Action(_restart, "restarted", (Column("restartedInstanceId", "RESTARTED AS"),)),
    "purge": Action(_purge, "purged", (Column("deletedInstanceCount", "DELETED"),)),
}


def act(args: argparse.Namespace) -> int:
    """Run `args.command` on the given instances, or on every instance matching the filter."""
    action = ACTIONS[args.command]
    selection = Selection.of(args)
    if args.instance_ids and selection:
        args.usage_error("give instance ids or a filter, not both")
    if not args.instance_ids and not selection:
        args.usage_error(
            "give instance ids, or a filter (--status, --name, --prefix, --created-after, "
            "--created-before) to act on every instance matching it"
        )
    columns = (*RESULT_COLUMNS, *action.columns)
    ids = list(dict.fromkeys(args.instance_ids))
    if not ids:
        ids = [
            state.instanceId
            for state in run(args.target, functools.partial(matching, selection=selection))
        ]
        if not ids:
            print(f"dt-trio: no instance matches {selection.describe()}", file=sys.stderr)
            emit(Listing([], columns), args.output)
            return 0
        question = f"{args.command} {_count(len(ids))} matching {selection.describe()}?"
        if not args.yes and not _confirm(question):
            print("dt-trio: nothing was done", file=sys.stderr)
            return 1
    records = run(args.target, functools.partial(_act_on_each, action=action, ids=ids, args=args))
    emit(Listing(records, columns), args.output)
    return 1 if any(record["error"] for record in records) else 0


def _count(n: int) -> str:
    return f"{n} instance" if n == 1 else f"{n} instances"


def _confirm(question: str) -> bool:
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


async def _act_on_each(
    sidecar: Sidecar, action: Action, ids: list[str], args: argparse.Namespace
) -> list[Record]:
    records: list[Record] = [{} for _ in ids]
    progress = Progress(args.command, len(ids), sys.stderr)
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def one(index: int, instance_id: str) -> None:
        async with limiter:
            try:
                fields = await action.act(sidecar, instance_id, args)
            except SidecarError as exc:
                print(f"dt-trio: {instance_id}: {exc}", file=sys.stderr)
                fields = {column.key: None for column in action.columns}
                error: dict[str, str] | None = {"code": exc.code, "message": exc.message}
                result = "failed"
            else:
                error, result = None, action.done
        records[index] = {"instanceId": instance_id, "result": result, **fields, "error": error}
        progress.advance()

    async with trio.open_nursery() as nursery:
        for index, instance_id in enumerate(ids):
            nursery.start_soon(one, index, instance_id)
    progress.finish()
    return records


class Progress:
    """How far an action on many instances is, on stderr: one line kept up to date on a
    terminal, else a line at every tenth of the way."""

    def __init__(self, verb: str, total: int, stream: TextIO) -> None:
        self._verb, self._total, self._stream = verb, total, stream
        self._done = self._tenths = 0
        self._shown = total > 1
        self._live = stream.isatty()

    def advance(self) -> None:
        self._done += 1
        if not self._shown:
            return
        if self._live:
            self._stream.write(f"\r{self._verb}: {self._done}/{self._total}")
        elif self._done * 10 // self._total > self._tenths:
            self._tenths = self._done * 10 // self._total
            self._stream.write(f"{self._verb}: {self._done}/{self._total}\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._shown and self._live:
            self._stream.write("\n")
            self._stream.flush()


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": list_instances,
    "show": show,
    "history": history,
    "start": start,
    "wait": wait,
    "raise-event": raise_event,
    **{name: act for name in ACTIONS},
}
