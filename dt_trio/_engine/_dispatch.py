"""The dispatcher: which work runs where and when, beside the commits that lease it.

The processors are straight lines (lease, plan, execute, apply); everything that makes a step
start sooner than its own lease would is decided here, once:

- Slots (`Lane`): each kind of work has at most so many items in flight; a lane runs its
  items in a nursery of its own and leases while it has room and a worker for its kind.
- Hand-overs: a commit that makes work for this process takes it in the same transaction
  (`TakeActivities`, `TakeInstance`) when a lane has room: the work starts without a lease
  and a wake-up of its own.
- Early sending: work for an SDK worker that a commit will take is sent to the worker beside
  that commit, not after it (`Early`); what the worker answers counts only once the commit is
  made, and only if it leased exactly what the worker ran.
- Steps run ahead: a step of an orchestration that runs in this process, on a creation or an
  activity's result, runs before that commit and is committed in it (`Ahead`): one commit
  instead of two, and no lease; if the instance changed meanwhile, the commit takes the
  ordinary way instead.
- Pacing (fan-in coalescing): while an instance waits for more activity results, its next
  step waits for them, at most as long as its last step kept the worker busy (`Pacing`).
"""

from __future__ import annotations

import functools
import itertools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import trio

from dt_trio import _core as core
from dt_trio._core import InboxMessage, InstanceState
from dt_trio._core import _events as ev
from dt_trio._core import _operations as ops
from dt_trio._core._commit import (
    ActivityWorkItem,
    Applied,
    Attempts,
    Commit,
    EntityWorkItem,
    Lease,
    OrchestrationWorkItem,
    WorkKind,
)
from dt_trio._engine._executor import Answer, Executor, OrchestrationStep, Route
from dt_trio._engine._pacing import Pacing, Parking
from dt_trio._engine._signals import Wakeup
from dt_trio._errors import InvalidRequest, LockLost, StoreUnavailable
from dt_trio._log import get_logger
from dt_trio._proto import orchestrator_service_pb2 as pb
from dt_trio._store import Backend, Leased

log = get_logger(__name__)
W = TypeVar("W")

# Without a commit from this process, look at the store at least this often (another process
# may share it, and a clock may jump).
IDLE_POLL_SECONDS = 5.0
# While the store cannot be used, the lanes look again this often.
STORE_RETRY_SECONDS = 1.0
# At most this many work items are leased in one transaction.
LEASE_BATCH = 64
# A step's first activities sent to a worker on their own, before the rest (see `_commit`).
EARLY_FIRST = 32


def utc_now() -> datetime:
    """The time, for what the engine and the service stamp (the core takes it as an argument)."""
    return datetime.now(UTC)


_now = utc_now


def _new_id() -> str:
    return uuid.uuid4().hex


def route_of(item: OrchestrationWorkItem | ActivityWorkItem | EntityWorkItem) -> Route:
    """Where an item goes: what an executor and a worker's filters look at."""
    if type(item) is OrchestrationWorkItem:
        return Route(WorkKind.ORCHESTRATION, item.state.name, item.state.version)
    if type(item) is ActivityWorkItem:
        scheduled = item.scheduled.taskScheduled
        return Route(WorkKind.ACTIVITY, scheduled.name, ev.opt_str(scheduled, "version"))
    assert isinstance(item, EntityWorkItem)
    return Route(WorkKind.ENTITY, core.entity_name(item.entity.instance_id))


class Early(Generic[W]):
    """Work started before the commit that leases it (see `Lane.start_early`). The commit
    tells it the item it leased, or None if it leased nothing (it failed, or the instance
    could not be leased); the worker runs meanwhile instead of after the commit.

    The commit is queued at once, not once the work is on its way: the store commits in a
    thread of its own while the event loop sends the work."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._item: W | None = None
        self.on_its_way = trio.Event()

    def commit_done(self, item: W | None) -> None:
        self._item = item
        self._done.set()

    async def leased(self) -> W | None:
        self.on_its_way.set()  # waiting for the commit: nothing of it goes out before
        if not self._done.is_set():
            # Shielded: the commit that decides it is shielded too, so this wait is short.
            with trio.CancelScope(shield=True):
                await self._done.wait()
        return self._item


async def leased(item: W, early: Early[W] | None) -> W | None:
    """The item as leased: work started early calls this before it touches the store, and
    stops if its commit leased nothing (the worker's answer is then dropped)."""
    return item if early is None else await early.leased()


# What a lane runs for each item: the item, and its `Early` if it started before its lease.
Process = Callable[[W, Early[W] | None], Awaitable[None]]


class Lane(Generic[W]):
    """The work of one kind this process runs: at most `size` items in flight (its slots),
    the nursery they run in while the lane serves, and leases given back that wait for the
    store.

    A lease released while the store cannot write (disk full, locked by another program) is
    not lost: the release is kept and retried before the next lease, so the item becomes
    visible again once the fault clears instead of staying leased until a restart.
    """

    def __init__(
        self,
        kind: WorkKind,
        store: Backend,
        executor: Executor,
        size: int,
        route: Callable[[W], Route],
    ) -> None:
        self.kind = kind
        self._store = store
        self._executor = executor
        self._route = route
        self._size = size
        self._slots = trio.Semaphore(size)
        self._lease_waiting = False  # the lease loop waits for a slot (see `_take_slots`)
        self._stranded: list[Commit] = []
        self._nursery: trio.Nursery | None = None
        self._process: Process[W] | None = None

    # -- slots ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """The items this lane holds: leased, or being leased beside a commit."""
        return self._size - self._slots.value

    def reserve(self, count: int) -> int:
        """Take up to `count` free slots now, without waiting; 0 while the lane does not
        serve or nothing runs its kind. Slots the lease loop is waiting for are never taken,
        so work waiting in the store goes first."""
        if self._nursery is None or self._lease_waiting:
            return 0
        if not self._executor.has_workers(self.kind):
            return 0
        return self._take_free(count)

    def unreserve(self, count: int) -> None:
        for _ in range(count):
            self._slots.release()

    def _take_free(self, count: int) -> int:
        """Take up to `count` slots that are free now."""
        taken = 0
        while taken < count:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                break
            taken += 1
        return taken

    async def _take_slots(self) -> int:
        """Wait for one free slot, then take as many more as are free (up to LEASE_BATCH).
        While it waits, `reserve` takes nothing: work waiting in the store goes first."""
        if not self._take_free(1):
            self._lease_waiting = True
            try:
                await self._slots.acquire()
            finally:
                self._lease_waiting = False
        return 1 + self._take_free(LEASE_BATCH - 1)

    # -- running work --------------------------------------------------------------------

    def accept(self, items: Sequence[W]) -> None:
        """Run items a commit leased to this process, each on a reserved slot. If the lane
        has stopped meanwhile (the hub is shutting down), the items stay leased until the
        store is opened next, which releases every lease."""
        if self._nursery is None or self._process is None:
            self.unreserve(len(items))
            return
        for item in items:
            self._nursery.start_soon(self._run, self._process, item, None)

    def start_early(self, items: Sequence[W]) -> list[Early[W] | None]:
        """Start `items`, which a commit not yet made will lease, each on a reserved slot,
        before that commit: each waits for its `Early` (`commit_done`) before it touches the
        store. Only work that runs in another process (an SDK worker) starts early; work run
        here gets None and starts once leased, as it would only compete with the commit for
        the interpreter."""
        assert self._nursery is not None and self._process is not None, "reserved: serving"
        early: list[Early[W] | None] = []
        for item in items:
            if self._executor.runs_here(self._route(item)):
                early.append(None)
            else:
                started: Early[W] = Early()
                early.append(started)
                self._nursery.start_soon(self._run, self._process, item, started)
        return early

    def commit_done(self, early: Sequence[Early[W] | None], leased: Sequence[W]) -> None:
        """After the commit: what it leased, in the order of the items given to
        `start_early` (those it did not lease are missing at the end). Early items learn
        their fate; the others start now, or free their slot if not leased."""
        for i, started in enumerate(early):
            item = leased[i] if i < len(leased) else None
            if started is not None:
                started.commit_done(item)  # the early task owns the slot
            elif item is not None:
                self.accept([item])
            else:
                self.unreserve(1)

    async def _run(self, process: Process[W], item: W, early: Early[W] | None) -> None:
        try:
            await process(item, early)
        finally:
            if early is not None:
                early.on_its_way.set()
            self._slots.release()

    # -- leases given back ---------------------------------------------------------------

    async def give_back(self, commit: Commit) -> None:
        """Apply a release (shielded from cancellation); kept for later if the store fails."""
        with trio.CancelScope(shield=True):
            try:
                await self._store.apply(commit)
            except StoreUnavailable:
                self._stranded.append(commit)
            except LockLost:
                pass  # the item moved on (purged, say): nothing left to give back

    async def _retry_stranded(self) -> bool:
        """Retry kept releases; False while the store still fails."""
        while self._stranded:
            try:
                await self._store.apply(self._stranded[0])
            except StoreUnavailable:
                return False
            except LockLost:
                pass
            self._stranded.pop(0)
        return True

    # -- the lease loop ------------------------------------------------------------------

    async def serve(
        self,
        lease: Callable[[int], Awaitable[Leased[W]]],
        process: Process[W],
        wakeup: Wakeup,
    ) -> None:
        """Lease as many items as there are free slots while some worker takes this kind,
        `process` each in a task of its own (which frees its slot), sleep until woken when
        there is nothing to do. While the store fails, wait and try again: the store logs the
        fault, callers get UNAVAILABLE."""
        async with trio.open_nursery() as nursery:
            self._nursery, self._process = nursery, process
            try:
                await self._lease_loop(nursery, lease, process, wakeup)
            finally:
                self._nursery = self._process = None

    async def _lease_loop(
        self,
        nursery: trio.Nursery,
        lease: Callable[[int], Awaitable[Leased[W]]],
        process: Process[W],
        wakeup: Wakeup,
    ) -> None:
        while True:
            if not await self._retry_stranded():
                await trio.sleep(STORE_RETRY_SECONDS)
                continue
            if not self._executor.has_workers(self.kind):
                # Nothing here runs this kind: leave it to whoever does (no lease churn).
                await self._executor.workers_changed()
                continue
            taken = await self._take_slots()
            wakeup.clear()
            try:
                items = await lease(taken)
            except StoreUnavailable:
                self.unreserve(taken)
                await trio.sleep(STORE_RETRY_SECONDS)
                continue
            self.unreserve(taken - len(items))
            for item in items:
                nursery.start_soon(self._run, process, item, None)
            if len(items) < taken:
                # The store had no more visible work: anything new sets `wakeup` (cleared
                # before the lease), so sleep instead of leasing again to find nothing.
                await _sleep_until_work(wakeup, items.next_at)


async def _sleep_until_work(wakeup: Wakeup, next_time: datetime | None) -> None:
    delay = IDLE_POLL_SECONDS
    if next_time is not None:
        delay = min(delay, max(0.0, (next_time - _now()).total_seconds()))
    with trio.move_on_after(delay):
        await wakeup.wait()


async def _all_on_their_way(early: Sequence[Early[Any] | None]) -> None:
    """Wait until the work started early is on its way to its workers (a turn of the event
    loop each, for those a worker's stream was waiting for)."""
    for started in early:
        if started is not None and not started.on_its_way.is_set():
            await started.on_its_way.wait()


# A function that builds the commit of a hand-over: given the owner to lease the instance to
# (None: lease nothing) and the step run ahead to commit in it, if any. Built as it is applied:
# its time is as late as it can be, so it sees what was committed before it.
Build = Callable[[str | None, ops.Ahead | None], Commit]


class Dispatcher:
    """The slots of this process's work (`orchestrations`, `activities`, `entities`) and
    every commit that may hand work to them (see the module's docstring)."""

    def __init__(
        self,
        store: Backend,
        executor: Executor,
        owner: str,
        *,
        pacing: Pacing | None = None,
        orchestration_slots: int = 256,
        activity_slots: int = 1024,
        entity_slots: int = 256,
    ) -> None:
        self.store = store
        self.executor = executor
        self.owner = owner
        self.orchestrations: Lane[OrchestrationWorkItem] = Lane(
            WorkKind.ORCHESTRATION, store, executor, orchestration_slots, route_of
        )
        self.activities: Lane[ActivityWorkItem] = Lane(
            WorkKind.ACTIVITY, store, executor, activity_slots, route_of
        )
        self.entities: Lane[EntityWorkItem] = Lane(
            WorkKind.ENTITY, store, executor, entity_slots, route_of
        )
        self.pacing = pacing if pacing is not None else Pacing()
        # Instances whose last step this process committed with nothing left in their
        # inbox, as that commit left them: what they wait for may start their next step
        # beside its delivery (see `expected_step`).
        self._parked = Parking()
        # Instances whose step is starting beside a commit not yet made (see `_hand_over`),
        # each with the event set once that commit is over.
        self._starting: dict[str, trio.Event] = {}
        # The lease of work built before the commit that leases it (see `Lease`).
        self._unleased = Lease(owner, 0)

    # -- the commits of steps --------------------------------------------------------------

    async def start(
        self,
        state: InstanceState,
        started: pb.HistoryEvent,
        visible_at: datetime,
        now: datetime,
        replaceable: frozenset[core.Status] | None = None,
    ) -> None:
        """Create an instance. Leased in its creation's transaction, its first step starts
        without a wake-up and a lease of its own and, if it starts now, beside that
        transaction (the message id is the store's to give: the step waits for it before
        its commit), or, run here, before it and committed in it."""
        build = functools.partial(ops.start, state, started, visible_at, now, replaceable)
        expected = None
        if visible_at <= now:
            inbox = [InboxMessage(0, started)]
            expected = OrchestrationWorkItem(state, [], inbox, self._unleased)
        await self._hand_over(build, expected)

    async def deliver(self, item: ActivityWorkItem, result: pb.HistoryEvent) -> None:
        """Commit an activity's `result` (and delete the activity). The orchestration, if
        idle, is leased in the same commit and its step starts at once, or runs before it and
        is committed in it; if it waits parked, its step starts beside this commit."""
        expected = await self.expected_step(item.instance_id, item.execution_id, result)

        def build(take: str | None, ahead: ops.Ahead | None) -> Commit:
            return ops.deliver_result(item, result, _now(), take, ahead)

        applied = await self._hand_over(build, expected)
        self.pacing.delivered(item.instance_id)
        if applied.dropped:
            log.warning(
                "%s: dropped the result of activity %d: the execution that scheduled it is gone",
                item.instance_id,
                item.scheduled.eventId,
                extra={"instance_id": item.instance_id},
            )

    async def commit_step(self, item: OrchestrationWorkItem, result: core.StepResult) -> None:
        """Commit the step of the leased `item` that made `result` (see `_commit`)."""

        async def commit(take_activities: int) -> Applied:
            return await self.store.apply(ops.step(item.lease, result, _now(), take_activities))

        await self._commit(item, result, commit)

    async def _commit(
        self,
        item: OrchestrationWorkItem,
        result: core.StepResult,
        commit: Callable[[int], Awaitable[Applied]],
    ) -> Applied:
        """Commit the step of `item` that made `result` with `commit(n)`, which leases up to
        `n` of its activities to us, then keep the instance parked if nothing waits for it.

        The activities a step schedules are leased in its own commit, as many as the
        activity lane has room for, and those for SDK workers are sent beside that commit
        instead of after it: an activity's result is delivered only once the commit is made
        (see `ActivityProcessor`); if it fails, the step runs again and so do they. If the
        commit took its `otherwise` (the step was not committed after all), it is returned
        as it is."""
        lane = self.activities
        reserved = lane.reserve(len(result.activities))
        unleased = self._unleased  # the row ids and the epoch are the commit's to give
        items = [
            ActivityWorkItem(0, a.instance_id, a.execution_id, a.scheduled, unleased)
            for a in result.activities[:reserved]
        ]
        # A fan-out's first activities start alone, the rest once those are on their way:
        # started together, every one is built before the first goes out (20 ms for 256).
        sent = lane.start_early(items[:EARLY_FIRST]) if items else []
        applied: Applied | None = None
        try:
            with trio.CancelScope(shield=True):
                if len(items) > len(sent):
                    await _all_on_their_way(sent)
                    sent += lane.start_early(items[len(sent) :])
                applied = await commit(reserved)
        finally:
            lane.commit_done(sent, applied.activities if applied is not None else ())
            lane.unreserve(len(items) - len(sent))  # never started (what came before failed)
        assert applied is not None  # (or the commit's error propagated)
        if applied.alternative:
            return applied
        state = item.state
        if result.state.status.is_terminal:
            self.pacing.forget(state.instance_id)
        elif not applied.waiting:
            history = result.history if result.reset_history else [*item.history, *result.history]
            self._parked.put(OrchestrationWorkItem(result.state, history, [], unleased))
        if result.state.status != state.status and result.state.status.is_terminal:
            status = result.state.status.label
            log.info(
                "%s: '%s' %s",
                state.instance_id,
                state.name,
                status,
                extra={
                    "instance_id": state.instance_id,
                    "orchestration": state.name,
                    "status": status,
                },
            )
        return applied

    # -- hand-overs: commits that lease an instance to this process ------------------------

    async def _hand_over(self, build: Build, expected: OrchestrationWorkItem | None) -> Applied:
        """Apply the commit `build` makes, which may lease an instance to us (its creation, an
        activity's result): with a free slot, its step then starts at once, with no lease and
        no wake-up of its own. `expected`: the work item the commit would lease, if it would
        start a step now.

        If that step runs in this process, it runs first, and is committed in the same
        transaction (one commit instead of two, and no lease); if the instance changed
        meanwhile, the store takes the ordinary way. If it runs on an SDK worker, it is sent
        to the worker beside the commit instead."""
        if expected is None:
            return await self._take(build)
        instance_id = expected.state.instance_id
        starting = self._starting[instance_id] = trio.Event()  # see `expected_step`
        try:
            if self.executor.runs_here(route_of(expected)):
                result = await self._run_ahead(expected)
                if result is not None:
                    return await self._commit_ahead(build, expected, result)
                return await self._take(build)  # the ordinary step handles what went wrong
            return await self._take(build, expected)
        finally:
            if self._starting.get(instance_id) is starting:
                del self._starting[instance_id]
            starting.set()

    async def _take(self, build: Build, expected: OrchestrationWorkItem | None = None) -> Applied:
        """Apply `build`'s commit, taking the instance if the orchestration lane has room.
        With `expected`, the item the commit will take if it succeeds, its work starts before
        the commit (see `Lane.start_early`). Shielded: a commit that leased an item must
        reach `commit_done`."""
        lane = self.orchestrations
        if not lane.reserve(1):
            with trio.CancelScope(shield=True):
                return await self.store.apply(build(None, None))
        early = lane.start_early([expected]) if expected is not None else [None]
        applied: Applied | None = None
        try:
            with trio.CancelScope(shield=True):
                applied = await self.store.apply(build(self.owner, None))
        finally:
            lane.commit_done(early, applied.orchestrations if applied is not None else ())
        assert applied is not None  # (or the commit's error propagated)
        return applied

    async def _commit_ahead(
        self, build: Build, item: OrchestrationWorkItem, result: core.StepResult
    ) -> Applied:
        """Commit `result`, the step of `item` run ahead, in `build`'s commit; if the store
        took the ordinary way instead and leased the instance to us, its step starts now."""
        lane = self.orchestrations
        slot = lane.reserve(1)  # for the lease of the ordinary way, if the store takes it
        taken: Sequence[OrchestrationWorkItem] = ()

        async def commit(take_activities: int) -> Applied:
            nonlocal taken
            ahead = ops.Ahead(result, item.state.last_updated_at, self.owner, take_activities)
            applied = await self.store.apply(build(self.owner if slot else None, ahead))
            taken = applied.orchestrations
            return applied

        try:
            return await self._commit(item, result, commit)
        finally:
            if taken:
                lane.accept(taken)
            elif slot:
                lane.unreserve(1)

    async def _run_ahead(self, item: OrchestrationWorkItem) -> core.StepResult | None:
        """The step of `item` (not leased) run here, or None if it cannot run this way."""
        state = item.state
        plan = core.plan_step(state, item.history, item.inbox, _now(), item.attempt)
        if not isinstance(plan, core.Dispatch):
            return None
        try:
            answer = await self.execute_step(item, plan)
        except Exception:
            return None
        result = answer.checked
        assert isinstance(result, core.StepResult)
        self.executor.finish(answer)
        return core.evolve(result, consumed=())  # nothing came through the inbox

    async def execute_step(
        self,
        item: OrchestrationWorkItem,
        plan: core.Dispatch,
        on_its_way: trio.Event | None = None,
    ) -> Answer:
        """Run the step `plan` of `item` on its worker; the answer's `checked` is the step's
        result. How long the worker took paces the instance's next step (see `Pacing`)."""
        state = item.state
        step = OrchestrationStep(
            state.instance_id,
            state.execution_id,
            plan.past_events,
            plan.new_events,
            state.trace_context,
        )
        dispatched = trio.current_time()
        answer = await self.executor.execute_step(
            step, route_of(item), on_its_way, functools.partial(_check_step, state, plan)
        )
        answered = trio.current_time()
        self.pacing.stepped(state.instance_id, answered, answered - dispatched)
        return answer

    # -- parked instances and paced steps --------------------------------------------------

    def unpark(self, instance_id: str) -> None:
        """The instance's state moves on (a step of it runs): it is no longer parked."""
        self._parked.pop(instance_id)

    async def expected_step(
        self, instance_id: str, execution_id: str, event: pb.HistoryEvent
    ) -> OrchestrationWorkItem | None:
        """The work item a delivery of `event` would lease, if the instance is parked here
        and its step would not wait for more results (else None): what `_hand_over` needs
        to start that step beside the delivery.

        If another delivery's commit is about to lease the instance for a step already
        started, this one waits for that commit (one transaction): committed first, it would
        lease the instance itself, and the started step (a whole replay on an SDK worker)
        would be dropped for a step of its own. After it, the instance is leased and this
        delivery only adds to its inbox, for the next step."""
        starting = self._starting.get(instance_id)
        if starting is not None:
            with trio.CancelScope(shield=True):  # that commit is shielded: the wait is short
                await starting.wait()
        parked = self._parked.pop(instance_id)
        if parked is None or parked.state.execution_id != execution_id:
            return None
        item = core.evolve(parked, inbox=[InboxMessage(0, event)])
        if self._holds_for(item) is not None:
            return None  # it is leased with the delivery and waits there (see `coalesce`)
        return item

    def _holds_for(self, item: OrchestrationWorkItem) -> float | None:
        """Until when the step of `item` waits for more activity results, if it does."""
        until = self.pacing.hold_until(item.state.instance_id, trio.current_time())
        if until is None or not _running(item.history, item.inbox):
            return None
        return until

    async def coalesce(self, item: OrchestrationWorkItem) -> OrchestrationWorkItem:
        """The leased `item`, after waiting for more activity results if it should (see
        `Pacing`), with every message its inbox has by then.

        Results are counted as their deliveries are committed, from before a read of the
        inbox: one delivered meanwhile is never missed (it is in the read or counted after
        it), and one counted twice only ends the wait early, to read again."""
        until = self._holds_for(item)
        if until is None:
            return item
        instance_id = item.state.instance_id
        inbox = item.inbox
        try:
            while True:
                with self.pacing.watch(instance_id) as watch:
                    inbox = await self.store.read_inbox(instance_id, item.lease, _now())
                    running = _running(item.history, inbox)
                    if not running or trio.current_time() >= until:
                        break
                    watch.expect(running)
                    with trio.move_on_at(until):
                        await watch.done.wait()
        except StoreUnavailable:
            pass  # what arrived meanwhile waits for the next step
        except BaseException:
            await self.orchestrations.give_back(ops.release(item, _now(), Attempts.KEEP))
            raise
        return core.evolve(item, inbox=inbox)


def _check_step(state: InstanceState, plan: core.Dispatch, response: object) -> core.StepResult:
    """An orchestrator's answer to the step `plan` of `state`, as that step's result; run as
    the worker delivers it (see `RemoteExecutor.deliver`)."""
    assert isinstance(response, pb.OrchestratorResponse)
    if response.instanceId != state.instance_id:
        raise InvalidRequest(
            f"the response names instance '{response.instanceId}', but its completion token "
            f"belongs to instance '{state.instance_id}'"
        )
    return core.apply_response(state, plan, response, _now(), _new_id)


def _running(history: Sequence[pb.HistoryEvent], inbox: Sequence[InboxMessage]) -> int:
    """How many of the activities in `history` have no result yet, in it or in `inbox`."""
    return core.running_activities(itertools.chain(history, (m.event for m in inbox)))
