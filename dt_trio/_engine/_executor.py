"""The remote executor: hands work items to SDK workers connected over GetWorkItems.

A processor calls `execute(work_item, route)` and gets the worker's answer back, or
`WorkAbandoned`. Each connected worker runs `stream(request)`. Waiting items sit in a FIFO
queue per kind; an item goes to a connected worker whose work-item filters accept its route
(kind, name, version) and that is below its concurrency hint for that kind, the least busy one
first. Every item sent carries a fresh completion token; an answer is found by that token.

Workers of older protocol generations (durabletask-go's; the Python SDK before 0.2, .NET before
1.6, Java before 1.5.1, the JavaScript SDK's 0.1 alphas) answer without a token: an orchestration
step names its instance, an activity its instance and task id. Such an answer is matched as
durabletask-go's sidecar matches it, by that key, but only among the items handed to workers not
seen to answer with tokens, and never while two of those items share the key: an item whose key
such a worker already holds waits until that one is answered or given back (or goes to a worker
that answers with tokens). A late answer for work a stream held when it ended names nothing that
waits (NOT_FOUND), unless the same work has meanwhile been handed to another worker of that
generation: the answer cannot be told apart from that worker's own, and is taken for it, as
durabletask-go takes it (an activity then counts as having run twice, as at-least-once allows; a
step's answer was computed from the same history and new events, and those that arrived since come
after them in the history, so its next replay sees them).

When a stream ends for any reason, the items it had not been sent yet go back to the queue for
another worker, and the items it held unanswered are abandoned at once, so the processor
releases the lease and the item is redelivered.

An item no connected worker accepts (none is connected, or their filters leave it out) waits
`unclaimed_seconds`, then goes back untried (`WorkUnclaimed`): its lease is released with its
attempts kept, so that another process's workers can take it. The processors lease only work
of a kind some worker takes (`has_workers`), so an idle hub without workers leases nothing.
"""

from __future__ import annotations

import collections
import itertools
import math
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from dt_trio._core._commit import WorkKind
from dt_trio._core._state import value
from dt_trio._errors import InvalidRequest, StoreUnavailable, UnknownWorkItem
from dt_trio._log import get_logger
from dt_trio._proto import orchestrator_service_pb2 as pb

log = get_logger(__name__)

# The .NET SDK and the Python SDK from 1.5 treat 120 s without a message on the stream as a
# silent disconnect; idle streams of workers that know the health ping get one well inside it.
HEALTH_PING_INTERVAL = 30.0
# How long an item no connected worker accepts waits for one before it is given back.
UNCLAIMED_SECONDS = 1.5


# The largest orchestrator answer taken in chunks (`isPartial`): the SDKs chunk answers over
# gRPC's 4 MiB message limit, and a worker that never ends its chunks must not fill the memory.
MAX_CHUNKED_ANSWER_BYTES = 64 * 1024 * 1024

# What an answer without a completion token names: the item's kind, its instance id and (for
# an activity) its task id, -1 otherwise. See the module docstring.
AnswerKey = tuple[WorkKind, str, int]

# The largest work item sent to a worker: gRPC's default limit on a received message, which
# the SDKs keep. A bigger one would end the worker's stream (and every item it holds) each
# time it is sent; it fails instead (see WorkTooLarge).
MAX_WORK_ITEM_BYTES = 4 * 1024 * 1024


class WorkTooLarge(Exception):
    """The work item is larger than a worker can receive: no worker will ever take it."""


class WorkAbandoned(Exception):
    """The worker gave the item back, or its stream ended before it answered."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay  # how long the item should stay invisible before it is retried


class WorkUnclaimed(Exception):
    """No connected worker accepts the item, and none that does connected in time: it was
    never tried, and goes back for whoever can run it."""


# What a processor makes of a worker's answer to one of its items: it returns what the
# processor needs from the answer, or raises if the answer does not fit the item (see
# `RemoteExecutor.complete`).
Check = Callable[[object], object]


@value
class Route:
    """What a worker's filters look at: the item's kind, name and version."""

    kind: WorkKind
    name: str
    version: str | None = None


@value
class OrchestrationStep:
    """One step for an orchestrator: the instance, its history so far and the new events.
    `work_item()` is its protocol form, built for SDK workers only: a replay in this process
    reads the events as they are."""

    instance_id: str
    execution_id: str
    past_events: Sequence[pb.HistoryEvent]
    new_events: Sequence[pb.HistoryEvent]
    trace_context: pb.OrchestrationTraceContext | None = None

    def work_item(self) -> pb.WorkItem:
        # Built in place: a message passed to a constructor is copied, history and all.
        work_item = pb.WorkItem()
        request = work_item.orchestratorRequest
        request.instanceId = self.instance_id
        request.pastEvents.extend(self.past_events)
        request.newEvents.extend(self.new_events)
        request.executionId.value = self.execution_id
        if self.trace_context is not None:
            request.orchestrationTraceContext.CopyFrom(self.trace_context)
        return work_item


def answer_key(work_item: pb.WorkItem) -> AnswerKey | None:
    """What an answer to `work_item` without a completion token names; None where such an
    answer names nothing (an EntityBatchResult carries no entity id)."""
    kind = work_item.WhichOneof("request")
    if kind == "orchestratorRequest":
        return WorkKind.ORCHESTRATION, work_item.orchestratorRequest.instanceId, -1
    if kind == "activityRequest":
        request = work_item.activityRequest
        return WorkKind.ACTIVITY, request.orchestrationInstance.instanceId, request.taskId
    return None


def escaped(text: str, limit: int = 200) -> str:
    """`text` for a log line: control characters escaped (an id or a worker's message must not
    forge log lines), at most `limit` characters."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return shown + ("..." if len(text) > limit else "")


def _named(key: AnswerKey) -> str:
    kind, instance_id, task_id = key
    if kind is WorkKind.ACTIVITY:
        return f"activity {task_id} of instance '{escaped(instance_id)}'"
    return f"a step of instance '{escaped(instance_id)}'"


def _describe(work_item: pb.WorkItem) -> tuple[str, str]:
    """The instance (or entity) a work item is for, escaped, and what the item is, for logs."""
    kind = work_item.WhichOneof("request")
    if kind == "orchestratorRequest":
        return f"'{escaped(work_item.orchestratorRequest.instanceId)}'", "a step"
    if kind == "activityRequest":
        request = work_item.activityRequest
        instance_id = escaped(request.orchestrationInstance.instanceId)
        return f"'{instance_id}'", f"activity {request.taskId} '{escaped(request.name)}'"
    if kind == "entityRequestV2":
        return f"'{escaped(work_item.entityRequestV2.instanceId)}'", "an entity batch"
    return "-", f"an {kind} work item"


def _gives_back(response: object) -> str | None:
    """Why the worker gave its item back instead of answering it, if it did: it expected the
    history or the entity's state to come separately (extended sessions). dt-trio sends both
    with every item, so the item is simply handed out again."""
    if isinstance(response, pb.OrchestratorResponse) and response.requiresHistory:
        return "the worker answered requiresHistory; the step is sent again with its history"
    if isinstance(response, pb.EntityBatchResult) and response.requiresState:
        return "the worker answered requiresState; the batch is sent again with the state"
    return None


@dataclass(eq=False)
class Pending:
    """One work item on its way to, or in the hands of, a worker."""

    token: str
    work_item: pb.WorkItem
    route: Route
    # What a token-less answer to it names (see `answer_key`).
    key: AnswerKey | None = None
    answered: trio.Event = field(default_factory=trio.Event)
    committed: trio.Event = field(default_factory=trio.Event)
    response: object = None
    # The item's check (see `RemoteExecutor.execute`), and what it made of the response.
    check: Check | None = None
    checked: object = None
    abandon_delay: float | None = None
    commit_error: BaseException | None = None
    worker: _Worker | None = None
    # Set once the item is on its way to a worker (see `RemoteExecutor.execute`).
    on_its_way: trio.Event | None = None
    # Given back because no worker accepts it (see `RemoteExecutor._answer`).
    unclaimed: bool = False
    # What the processor's task waits on: set once answered or abandoned, and when the last
    # worker that took the item's kind leaves while it waits in the queue (then it waits for
    # another one in time; see `_answer`).
    wake: trio.Event = field(default_factory=trio.Event)
    # An orchestrator answer coming in chunks: the chunks so far, merged (see `_whole`).
    chunks: pb.OrchestratorResponse | None = None
    chunk_count: int = 0
    chunk_bytes: int = 0
    # When it was queued (time.monotonic()): the age of work waiting for a worker.
    queued_at: float = 0.0

    def went_out(self) -> None:
        if self.on_its_way is not None:
            self.on_its_way.set()

    def abandon(self, delay: float) -> None:
        if not self.answered.is_set():
            self.abandon_delay = delay
            self.mark_answered()

    def mark_answered(self) -> None:
        self.answered.set()
        self.wake.set()

    def ack(self, error: BaseException | None = None) -> None:
        """Tell the completing rpc how its commit went."""
        self.commit_error = error
        self.committed.set()


# name -> accepted versions (empty: any version); None: the worker takes every name.
NameFilter = Mapping[str, frozenset[str]] | None


def _name_filter(filters: object, opted_in: bool) -> NameFilter:
    if not opted_in:
        return None
    accepted: dict[str, frozenset[str]] = {}
    for f in filters:  # type: ignore[attr-defined]
        accepted[f.name] = accepted.get(f.name, frozenset()) | frozenset(f.versions)
    return accepted


def _knows_health_ping(request: pb.GetWorkItemsRequest) -> bool:
    """Whether the worker that sent `request` is of a generation that reads the health ping.

    The ping helps only the SDKs that take 120 s of silence for a lost stream (.NET, Python
    from 1.5); SDKs of the generation before the ping (durabletask-go, Python before 0.2,
    JavaScript 0.1, .NET before 1.6, Java before 1.5.1) log each one as an unknown work item.
    Every SDK that sends a field of GetWorkItemsRequest newer than the ping (the concurrency
    limits, capabilities, filters, worker_instance_id), as the two that need it do, reads it;
    so does every worker that answers with completion tokens, which came with it (see
    `RemoteExecutor.lookup`)."""
    return bool(
        request.maxConcurrentOrchestrationWorkItems
        or request.maxConcurrentActivityWorkItems
        or request.maxConcurrentEntityWorkItems
        or request.capabilities
        or request.HasField("workItemFilters")
        or request.worker_instance_id
    )


class _Worker:
    """A connected GetWorkItems stream and what it asked for."""

    def __init__(self, number: int, request: pb.GetWorkItemsRequest) -> None:
        self.number = number
        self.name = request.worker_instance_id or f"stream {number}"
        opted_in = request.HasField("workItemFilters")
        filters = request.workItemFilters
        self.filters: dict[WorkKind, NameFilter] = {
            WorkKind.ORCHESTRATION: _name_filter(filters.orchestrations, opted_in),
            WorkKind.ACTIVITY: _name_filter(filters.activities, opted_in),
            # Entity names are case-insensitive (ids carry them in lower case) and unversioned.
            WorkKind.ENTITY: {f.name.lower(): frozenset() for f in filters.entities}
            if opted_in
            else None,
        }
        # The SDKs' maxConcurrent*WorkItems: 0 (unset) means no limit.
        self.limits = {
            WorkKind.ORCHESTRATION: request.maxConcurrentOrchestrationWorkItems or math.inf,
            WorkKind.ACTIVITY: request.maxConcurrentActivityWorkItems or math.inf,
            WorkKind.ENTITY: request.maxConcurrentEntityWorkItems or math.inf,
        }
        self.in_flight: collections.Counter[WorkKind] = collections.Counter()
        # Whether the worker answers with completion tokens: known from its first answer that
        # carries one. Until then its items may be answered without one (see `lookup`).
        self.tokens = False
        # Whether its idle stream gets health pings (see `_knows_health_ping`).
        self.pings = _knows_health_ping(request)
        # The stream waits for its next item: one handed to it goes out in its next turn.
        self.waiting = False
        # Items sent on this stream and not finished yet: abandoned if the stream ends.
        self.held: dict[str, Pending] = {}
        self.send, self.receive = trio.open_memory_channel[Pending](math.inf)

    def accepts(self, route: Route) -> bool:
        accepted = self.filters.get(route.kind)
        if accepted is None:
            return True
        versions = accepted.get(route.name)
        if versions is None:
            return False
        return not versions or (route.version or "") in versions

    def takes(self, kind: WorkKind) -> bool:
        """Whether the worker takes any work of `kind` (its filters may leave a kind out)."""
        accepted = self.filters[kind]
        return accepted is None or bool(accepted)

    def has_room(self, kind: WorkKind) -> bool:
        return self.in_flight[kind] < self.limits[kind]


class RemoteExecutor:
    """The bridge between the processors and the workers' GetWorkItems streams."""

    def __init__(
        self,
        max_work_item_bytes: int = MAX_WORK_ITEM_BYTES,
        unclaimed_seconds: float = UNCLAIMED_SECONDS,
    ) -> None:
        self.max_work_item_bytes = max_work_item_bytes
        self.unclaimed_seconds = unclaimed_seconds
        # One queue per kind: when no worker has room for activities, say, the items behind
        # them are not walked over at every dispatch.
        self._queues: dict[WorkKind, collections.deque[Pending]] = {
            kind: collections.deque() for kind in WorkKind
        }
        self._pending: dict[str, Pending] = {}
        # The items handed to workers not seen to answer with tokens, by what an answer
        # without one names: at most one item per key (see `_dispatch_kind`).
        self._tokenless: dict[AnswerKey, Pending] = {}
        self._workers: list[_Worker] = []
        self._numbers = itertools.count(1)
        self._workers_changed = trio.Event()
        # How many connected workers take each kind (see `has_workers`).
        self._takers: collections.Counter[WorkKind] = collections.Counter()
        # Routes said to wait for a worker (see `_report_waiting`), until a worker connects.
        self._reported: set[Route] = set()

    @property
    def connected(self) -> int:
        return len(self._workers)

    def waiting(self, kind: WorkKind) -> tuple[int, float | None]:
        """How many items of `kind` wait for a worker to take them, and when the oldest was
        queued (time.monotonic(); None: none waits). Walks the queue: for a scrape, not for
        the hot path."""
        count = 0
        oldest: float | None = None
        for pending in self._queues[kind]:
            if pending.answered.is_set():
                continue  # withdrawn, still in the queue
            count += 1
            if oldest is None or pending.queued_at < oldest:
                oldest = pending.queued_at
        return count, oldest

    # -- processor side --------------------------------------------------------------------

    def runs_here(self, route: Route) -> bool:
        return False

    def has_workers(self, kind: WorkKind) -> bool:
        """Whether a connected worker takes work of `kind`."""
        return self._takers[kind] > 0

    async def workers_changed(self) -> None:
        """Return once a worker connects or leaves."""
        await self._workers_changed.wait()

    def _note_workers_changed(self) -> None:
        self._takers = collections.Counter(k for w in self._workers for k in WorkKind if w.takes(k))
        self._workers_changed.set()
        self._workers_changed = trio.Event()

    async def execute_step(
        self,
        step: OrchestrationStep,
        route: Route,
        on_its_way: trio.Event | None = None,
        check: Check | None = None,
    ) -> Pending:
        return await self.execute(step.work_item(), route, on_its_way, check)

    async def execute(
        self,
        work_item: pb.WorkItem,
        route: Route,
        on_its_way: trio.Event | None = None,
        check: Check | None = None,
    ) -> Pending:
        """Send `work_item` to a worker that accepts `route` and wait for its answer.

        Returns the answered `Pending`; the caller must `finish()` it once the result is
        committed (or failed to commit). Raises `WorkAbandoned`, or `WorkTooLarge` for an item
        no worker can receive. On cancellation the item is
        withdrawn.

        With `check`, the answer is checked as the worker delivers it, and the worker's rpc
        answered at once (see `complete`); the answered `Pending` then carries what the
        check made of it (`checked`). An answer the check refuses is refused to the worker,
        and the item abandoned (handed out again).

        `on_its_way` is set once the item is on its way: taken by the stream of a worker that
        was waiting for work, or at once if no such stream can take it now (it waits in the
        queue, or behind the stream's other items).
        """
        size = work_item.ByteSize()
        if size > self.max_work_item_bytes:
            raise WorkTooLarge(
                f"the {route.kind} work item for '{route.name}' is {size} bytes, more than the "
                f"{self.max_work_item_bytes} bytes a worker receives (gRPC's default message "
                "limit); keep inputs, outputs and histories smaller (the SDKs can store large "
                "payloads outside the history)"
            )
        token = secrets.token_hex(12)
        work_item.completionToken = token
        pending = Pending(
            token,
            work_item,
            route,
            answer_key(work_item),
            on_its_way=on_its_way,
            check=check,
            queued_at=time.monotonic(),
        )
        self._pending[token] = pending
        self._queues[route.kind].append(pending)
        self._dispatch()
        if pending.worker is None:
            pending.went_out()  # queued: nothing to wait for
            self._report_waiting(route)
        try:
            await self._answer(pending)
        except BaseException:
            pending.abandon(0.0)
            self.finish(
                pending,
                StoreUnavailable("the sidecar withdrew the work item; it will be redelivered"),
            )
            raise
        if pending.unclaimed:
            self.finish(pending)
            raise WorkUnclaimed(
                f"no connected worker takes the {route.kind.value} work item for "
                f"'{route.name}'; it goes back untried"
            )
        if pending.abandon_delay is not None:
            self.finish(pending)
            raise WorkAbandoned(f"work item {token} was abandoned", pending.abandon_delay)
        return pending

    async def _answer(self, pending: Pending) -> None:
        """Wait until the item is answered or abandoned, or, while no connected worker
        accepts it, at most `unclaimed_seconds` (then it is abandoned as `unclaimed`)."""
        while not pending.answered.is_set():
            if pending.worker is None and not self._claimable(pending.route):
                with trio.move_on_after(self.unclaimed_seconds) as waited:
                    await pending.wake.wait()
                if waited.cancelled_caught and pending.worker is None:
                    if not self._claimable(pending.route):
                        pending.unclaimed = True
                        pending.abandon(0.0)
            else:
                await pending.wake.wait()
            if not pending.answered.is_set():
                pending.wake = trio.Event()  # woken to look again (see `stream`)

    def _claimable(self, route: Route) -> bool:
        return any(w.accepts(route) for w in self._workers)

    def _report_waiting(self, route: Route) -> None:
        """Say once that work waits because no connected worker takes it at all (none is
        connected, or none whose filters accept it), not merely none with room: a name no
        worker registers would otherwise wait in silence. Said again after a worker
        connects."""
        if route in self._reported or any(w.accepts(route) for w in self._workers):
            return
        self._reported.add(route)
        log.info(
            "%s '%s' waits: no code in this process and no connected SDK worker takes it",
            route.kind.value,
            route.name,
        )

    def finish(self, pending: Pending, error: BaseException | None = None) -> None:
        """Forget the item, free its worker's slot and release the rpc that completed it."""
        self._unkey(pending)
        if self._pending.pop(pending.token, None) is not None and pending.worker is not None:
            pending.worker.in_flight[pending.route.kind] -= 1
            pending.worker.held.pop(pending.token, None)
            self._dispatch()
        pending.ack(error)

    def _unkey(self, pending: Pending) -> None:
        if pending.key is not None and self._tokenless.get(pending.key) is pending:
            del self._tokenless[pending.key]

    def _key_held(self, pending: Pending) -> bool:
        """Whether another item with the key of `pending` is in the hands of a worker that may
        answer without a token (its answer would name both)."""
        if pending.key is None:
            return False
        other = self._tokenless.get(pending.key)
        return other is not None and other is not pending and not other.answered.is_set()

    def _dispatch(self) -> None:
        """Hand queued items to workers that accept them and have room."""
        if not self._workers:
            return
        for kind, queue in self._queues.items():
            if queue:
                self._dispatch_kind(kind, queue)

    def _dispatch_kind(self, kind: WorkKind, queue: collections.deque[Pending]) -> None:
        """Items of one kind in order, while some worker has room for that kind; an item that
        no worker with room accepts (work-item filters) waits without holding up the rest."""
        skipped: list[Pending] = []
        while queue:
            with_room = [w for w in self._workers if w.has_room(kind)]
            if not with_room:
                break
            pending = queue.popleft()
            if pending.answered.is_set():
                continue  # withdrawn while queued
            candidates = [w for w in with_room if w.accepts(pending.route)]
            if candidates and self._key_held(pending):
                # Only a worker that answers with tokens can tell the two apart.
                candidates = [w for w in candidates if w.tokens]
            if not candidates:
                skipped.append(pending)
                continue
            worker = min(candidates, key=lambda w: sum(w.in_flight.values()))
            worker.in_flight[kind] += 1
            pending.worker = worker
            if pending.key is not None and not worker.tokens:
                self._tokenless[pending.key] = pending
            worker.send.send_nowait(pending)
            if not worker.waiting:
                pending.went_out()  # behind the stream's other items: not waited for
        queue.extendleft(reversed(skipped))

    # -- rpc side --------------------------------------------------------------------------

    def lookup(
        self, token: str, key: AnswerKey | None = None, kind: WorkKind | None = None
    ) -> Pending:
        """The item an answer is for: the one sent with completion token `token`; or, for an
        answer that carries none, the one in a worker's hands that `key` names (see the
        module docstring). UnknownWorkItem if no item waits for it; with `kind`, an answer to
        an item of another kind is refused, and the item handed out again."""
        if not token:
            if key is None:
                raise self._unmatched(
                    InvalidRequest(
                        "completionToken is empty, and this answer names no work item (only "
                        "an orchestration step or an activity can be answered without one)"
                    )
                )
            return self._lookup_key(key)
        pending = self._pending.get(token)
        if pending is None or pending.answered.is_set() or pending.worker is None:
            raise self._unmatched(
                UnknownWorkItem(
                    f"no work item is waiting for completion token '{escaped(token)}': it is "
                    "unknown, already completed or abandoned, or was redelivered after its "
                    "stream ended"
                )
            )
        if kind is not None and pending.route.kind is not kind:
            error = InvalidRequest(
                f"completion token '{escaped(token)}' belongs to an "
                f"{pending.route.kind.value} work item, not an {kind.value}"
            )
            self.refuse(pending, error)
            raise error
        if not pending.worker.tokens:
            self._learn_tokens(pending.worker)
        return pending

    def _lookup_key(self, key: AnswerKey) -> Pending:
        pending = self._tokenless.get(key)
        if (
            pending is None
            or pending.answered.is_set()
            or pending.worker is None
            or pending.token not in pending.worker.held  # not sent yet
        ):
            raise self._unmatched(
                UnknownWorkItem(
                    f"no work item handed out waits for an answer to {_named(key)}: it is "
                    "unknown, already completed or abandoned, or was redelivered after its "
                    "stream ended (an answer without a completionToken is matched by instance "
                    "id and task id)"
                )
            )
        return pending

    @staticmethod
    def _unmatched(error: Exception) -> Exception:
        """Log an answer that no item waits for (it changes nothing) and return the error."""
        log.info("a worker's answer is refused and changes nothing: %s", error)
        return error

    def _learn_tokens(self, worker: _Worker) -> None:
        """`worker` answers with completion tokens: its items are no longer matched by key,
        and its idle stream gets health pings (every SDK that sends tokens reads them)."""
        worker.tokens = worker.pings = True
        for key, pending in list(self._tokenless.items()):
            if pending.worker is worker:
                del self._tokenless[key]
        self._dispatch()  # items held back for the keys it held may go now

    def refuse(self, pending: Pending, reason: BaseException | str) -> None:
        """Refuse a worker's answer to `pending` (logged once) and hand the item out again,
        at once: its processor counts the attempt (see `WorkAbandoned`), so poison work is
        still capped."""
        where, what = _describe(pending.work_item)
        log.warning(
            "%s: a worker's answer to %s is refused, and the item handed out again: %s",
            where,
            what,
            escaped(str(reason), 1000),
        )
        pending.abandon(0.0)

    def _give_back(self, pending: Pending, reason: str) -> None:
        where, what = _describe(pending.work_item)
        log.info("%s: %s: %s", where, what, reason)
        pending.abandon(0.0)

    def deliver(self, pending: Pending, response: object) -> None:
        """Deliver a worker's answer to an item that came with a check (see `execute`): the
        answer is checked here, and the worker's rpc can be answered at once, as
        durabletask-go answers: the commit, and the item's redelivery if that fails, are its
        processor's. An answer the check refuses is refused to the worker (the check's error
        propagates), logged, and the item is handed out again. An orchestrator answer in
        chunks is checked once its last chunk is in."""
        if pending.answered.is_set():
            raise UnknownWorkItem(f"work item '{pending.token}' was already answered")
        assert pending.check is not None, "an item without a check is answered by `complete`"
        try:
            whole = self._whole(pending, response)
            if whole is None:
                return  # a chunk: the rest follows
            gives_back = _gives_back(whole)
            if gives_back is not None:
                self._give_back(pending, gives_back)
                return
            pending.checked = pending.check(whole)
        except Exception as exc:
            self.refuse(pending, exc)  # handed out again: nothing is lost
            raise
        pending.response = whole
        pending.mark_answered()

    @staticmethod
    def _whole(pending: Pending, response: object) -> object | None:
        """The worker's whole answer: `response`, or for an orchestrator answer sent in
        chunks (`isPartial`, `chunkIndex`: .NET and Java split an answer over gRPC's message
        limit), the chunks merged once the last is in; None before. The first chunk carries
        the custom status and the trace context, each chunk a share of the actions."""
        if not isinstance(response, pb.OrchestratorResponse):
            return response
        chunked = response.isPartial or pending.chunks is not None
        if not chunked and (not response.HasField("chunkIndex") or response.chunkIndex.value == 0):
            return response
        expected = pending.chunk_count
        if response.HasField("chunkIndex"):
            index = response.chunkIndex.value
            if index == expected - 1 and response.isPartial:
                return None  # the last chunk sent again (the worker retried it): taken once
            if index != expected:
                raise InvalidRequest(
                    f"the answer's chunk {index} came where chunk {expected} was expected"
                )
        if pending.chunks is not None and response.instanceId != pending.chunks.instanceId:
            raise InvalidRequest(
                f"chunk {expected} names instance '{response.instanceId[:200]}', the chunks "
                f"before it '{pending.chunks.instanceId[:200]}'"
            )
        pending.chunk_bytes += response.ByteSize()
        if pending.chunk_bytes > MAX_CHUNKED_ANSWER_BYTES:
            raise InvalidRequest(
                f"the answer's chunks exceed {MAX_CHUNKED_ANSWER_BYTES} bytes in all"
            )
        pending.chunk_count += 1
        if pending.chunks is None:
            pending.chunks = response
        else:
            pending.chunks.actions.extend(response.actions)
        if response.isPartial:
            return None
        whole = pending.chunks
        whole.isPartial = False
        whole.ClearField("chunkIndex")
        return whole

    async def complete(self, pending: Pending, response: object) -> None:
        """Deliver a worker's answer and wait until its processor has committed it (see
        `finish`): for an item without a check (an entity batch), only the commit tells
        whether the results hold. An item with a check is answered at once (`deliver`)."""
        if pending.check is not None:
            self.deliver(pending, response)
            return
        if pending.answered.is_set():
            raise UnknownWorkItem(f"work item '{pending.token}' was already answered")
        gives_back = _gives_back(response)
        if gives_back is not None:
            self._give_back(pending, gives_back)
            return
        pending.response = response
        pending.mark_answered()
        with trio.CancelScope(shield=True):
            # The commit happens whether or not the caller stays; its outcome is the answer.
            await pending.committed.wait()
        if pending.commit_error is not None:
            raise pending.commit_error

    async def stream(self, request: pb.GetWorkItemsRequest) -> AsyncGenerator[pb.WorkItem, None]:
        """The work items of one connected worker, with health pings while idle."""
        worker = _Worker(next(self._numbers), request)
        self._workers.append(worker)
        self._reported.clear()
        log.info("worker stream %d connected (%s)", worker.number, worker.name)
        self._note_workers_changed()
        self._dispatch()
        try:
            while True:
                pending: Pending | None = None
                try:
                    # Under load the next item is already here: no timeout scope to set up
                    # (a cancel scope with a deadline per item was 1.5% of the sidecar's time
                    # under the hello-cities bench).
                    pending = worker.receive.receive_nowait()
                    queued = True
                except trio.WouldBlock:
                    queued = False
                    with trio.move_on_after(HEALTH_PING_INTERVAL):
                        worker.waiting = True
                        try:
                            pending = await worker.receive.receive()
                        finally:
                            worker.waiting = False
                if pending is None:
                    if worker.pings:
                        yield pb.WorkItem(healthPing=pb.HealthPing())
                    continue
                pending.went_out()
                if pending.answered.is_set():
                    continue  # withdrawn while on its way
                worker.held[pending.token] = pending
                if queued:
                    # The turn of the event loop that receiving takes: a burst of items
                    # cannot hog it. (Held first: cancelled here, the item is redelivered.)
                    await trio.lowlevel.checkpoint()
                yield pending.work_item
        finally:
            self._workers.remove(worker)
            worker.send.close()
            unsent = []
            while True:
                try:
                    unsent.append(worker.receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            for pending in unsent:  # never seen by this worker: another may take it
                worker.in_flight[pending.route.kind] -= 1
                pending.worker = None
                self._unkey(pending)
                self._queues[pending.route.kind].appendleft(pending)
            abandoned = [p for p in worker.held.values() if not p.answered.is_set()]
            for pending in abandoned:
                pending.abandon(0.0)
            log.info(
                "worker stream %d ended; %d work item(s) it held will be redelivered",
                worker.number,
                len(abandoned) + len(unsent),
            )
            self._note_workers_changed()
            for pending in self._pending.values():
                # Waiting for a worker no connected one is any more: wait for one in time.
                if pending.worker is None and not self._claimable(pending.route):
                    pending.wake.set()
            self._dispatch()


class Answer(Protocol):
    """A work item's answer: an OrchestratorResponse, ActivityResponse or EntityBatchResult."""

    @property
    def response(self) -> object: ...

    @property
    def checked(self) -> object:
        """What the check given to `execute` made of the response."""
        ...


class Executor(Protocol):
    """Runs work items for the processors: `execute` returns the answer, and `finish` is
    called once it is committed (or failed to commit), with the error if any."""

    async def execute(
        self,
        work_item: pb.WorkItem,
        route: Route,
        on_its_way: trio.Event | None = None,
        check: Check | None = None,
    ) -> Answer:
        """The answer to `work_item`; `on_its_way` is set once the item is on its way to
        whoever runs it; the answer's `checked` is what `check` made of it (see
        `RemoteExecutor.execute`)."""
        ...

    async def execute_step(
        self,
        step: OrchestrationStep,
        route: Route,
        on_its_way: trio.Event | None = None,
        check: Check | None = None,
    ) -> Answer:
        """The orchestrator's answer to `step`, as `execute` answers a work item."""
        ...

    def finish(self, answer: Answer, error: BaseException | None = None) -> None: ...

    def runs_here(self, route: Route) -> bool:
        """Whether work on `route` runs in this process (else on an SDK worker)."""
        ...

    def has_workers(self, kind: WorkKind) -> bool:
        """Whether anything (this process's code, a connected worker) runs work of `kind`:
        a processor leases only work that some worker can take."""
        ...

    async def workers_changed(self) -> None:
        """Return once `has_workers` may answer differently."""
        ...


class LocalRunner(Executor, Protocol):
    """An executor for the work this process can run itself (dt_trio._local)."""

    def accepts(self, route: Route) -> bool:
        """Whether this process has the code for work on `route`."""
        ...


class RoutingExecutor:
    """Work this process can run goes to `local`; everything else to the SDK workers connected
    to `remote`. One hub can so serve Python code in-process and remote workers at once."""

    def __init__(self, local: LocalRunner | None, remote: RemoteExecutor) -> None:
        self.local = local
        self.remote = remote

    def runs_here(self, route: Route) -> bool:
        return self.local is not None and self.local.accepts(route)

    def has_workers(self, kind: WorkKind) -> bool:
        if self.local is not None and self.local.has_workers(kind):
            return True
        return self.remote.has_workers(kind)

    async def workers_changed(self) -> None:
        await self.remote.workers_changed()  # this process's code does not change

    async def execute(
        self,
        work_item: pb.WorkItem,
        route: Route,
        on_its_way: trio.Event | None = None,
        check: Check | None = None,
    ) -> Answer:
        return await self._runner(route).execute(work_item, route, on_its_way, check)

    async def execute_step(
        self,
        step: OrchestrationStep,
        route: Route,
        on_its_way: trio.Event | None = None,
        check: Check | None = None,
    ) -> Answer:
        return await self._runner(route).execute_step(step, route, on_its_way, check)

    def _runner(self, route: Route) -> LocalRunner | RemoteExecutor:
        if self.local is not None and self.local.accepts(route):
            return self.local
        return self.remote

    def finish(self, answer: Answer, error: BaseException | None = None) -> None:
        if isinstance(answer, Pending):
            self.remote.finish(answer, error)
        elif self.local is not None:
            self.local.finish(answer, error)
