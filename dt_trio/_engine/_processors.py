"""The orchestration and activity processors: lease work, run it, commit the result.

Each processor is one long-running task that owns a nursery of in-flight work items. It leases
while it has capacity; when the store has nothing visible it sleeps until a commit wakes it
(`Signals`) or until the earliest future message (a timer, a scheduled start) becomes visible.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import trio

from dt_trio import _core as core
from dt_trio._core import InboxMessage, InstanceState
from dt_trio._core import _events as ev
from dt_trio._engine._executor import (
    ACTIVITY,
    ENTITY,
    ORCHESTRATION,
    Executor,
    OrchestrationStep,
    Route,
    WorkAbandoned,
    WorkTooLarge,
    escaped,
)
from dt_trio._engine._signals import Signals, Wakeup
from dt_trio._errors import InvalidRequest, LockLost, StoreUnavailable
from dt_trio._log import get_logger
from dt_trio._proto import orchestrator_service_pb2 as pb
from dt_trio._store import (
    ActivityWorkItem,
    Backend,
    EntityWorkItem,
    Handed,
    Leased,
    OrchestrationWorkItem,
    StepAhead,
)

log = get_logger(__name__)
W = TypeVar("W")
# What a commit that may lease an instance returns: its work item if it leased it, the
# activities it leased if it committed a step run ahead (see `OrchestrationProcessor.hand_over`).
Committed = OrchestrationWorkItem | Handed[ActivityWorkItem] | None

# Without a commit from this process, look at the store at least this often (another process
# may share it, and a clock may jump).
IDLE_POLL_SECONDS = 5.0
# An activity handed out this many times without an answer fails its task.
MAX_ACTIVITY_ATTEMPTS = 10
# A step that failed unexpectedly is tried again after this long.
FAILED_STEP_RETRY_SECONDS = 5.0
# While the store cannot be used, the processors look again this often.
STORE_RETRY_SECONDS = 1.0


def _backoff(attempt: int) -> float:
    """How long work given back for the `attempt`-th time waits before it is handed out again.

    Nothing the first time (a worker that dies takes nothing with it: another one gets the item
    at once); then 0.1 s, doubling, at most 30 s, until the attempt cap turns it into a failure.
    """
    return 0.0 if attempt <= 1 else min(0.1 * 2 ** (attempt - 2), 30.0)


def _log_failure(processor: str, what: str, exc: Exception) -> None:
    if isinstance(exc, StoreUnavailable):
        # the store logged the fault itself; no traceback for each item it hits
        log.warning("%s: %s waits for the store: %s", processor, what, exc)
    else:
        log.exception("%s: %s failed; it is retried later", processor, what)


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return uuid.uuid4().hex


# At most this many work items are leased in one transaction.
LEASE_BATCH = 64
# A step's first activities sent to a worker on their own, before the rest (see `_commit`).
EARLY_FIRST = 32


class Early(Generic[W]):
    """Work started before the commit that leases it (see `Processor._hand_over`). The commit
    settles it with the item it leased, or None if it leased nothing (it failed, or the
    instance could not be leased); the worker runs meanwhile instead of after the commit.

    The commit starts once the work is `on_its_way` to its worker (see `_commit_after`)."""

    def __init__(self) -> None:
        self._settled = trio.Event()
        self._item: W | None = None
        self.on_its_way = trio.Event()

    def settle(self, item: W | None) -> None:
        self._item = item
        self._settled.set()

    async def leased(self) -> W | None:
        self.on_its_way.set()  # waiting for the commit: nothing of it goes out before
        if not self._settled.is_set():
            # Shielded: the commit that settles it is shielded too, so this wait is short.
            with trio.CancelScope(shield=True):
                await self._settled.wait()
        return self._item


class Processor(Generic[W]):
    """What the three processors share: the lease loop, one task per leased item, and
    releases that outlast a store outage.

    A lease released while the store cannot write (disk full, locked by another program) is
    not lost: the release is kept and retried before the next lease, so the item becomes
    visible again once the fault clears instead of staying leased until a restart.

    A processor says how it leases (`_lease`, `_wakeup`), how it runs one item
    (`_step`) and how it gives an item back after an unexpected failure (`_give_back`).
    """

    name = "processor"

    def __init__(
        self,
        store: Backend,
        executor: Executor,
        signals: Signals,
        owner: str,
        max_in_flight: int = 256,
    ) -> None:
        self._store = store
        self._executor = executor
        self._signals = signals
        self._owner = owner
        self._slots = trio.Semaphore(max_in_flight)
        self._lease_waiting = False  # the lease loop waits for a slot (see `_take_slots`)
        self._stranded: list[Callable[[], Awaitable[None]]] = []
        self._nursery: trio.Nursery | None = None

    # -- hand-over: work leased for this processor in another processor's commit -------------

    def reserve(self, count: int) -> int:
        """Take up to `count` free slots now, without waiting; 0 while not running. Slots the
        lease loop is waiting for are never taken, so work waiting in the store goes first."""
        if self._nursery is None or self._lease_waiting:
            return 0
        return self._take_free(count)

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

    def unreserve(self, count: int) -> None:
        for _ in range(count):
            self._slots.release()

    def accept(self, items: Sequence[W]) -> None:
        """Run items leased to this process by another commit, each on a reserved slot. If
        the processor has stopped meanwhile (the hub is shutting down), the items stay leased
        until the store is opened next, which releases every lease."""
        if self._nursery is None:
            self.unreserve(len(items))
            return
        for item in items:
            self._nursery.start_soon(self._process, item)

    def start_early(self, items: Sequence[W]) -> list[Early[W] | None]:
        """Start `items`, which a commit not yet made will lease, each on a reserved slot,
        before that commit: each waits for its `Early` to be settled (`settle_early`) before
        it touches the store (see `_leased`). Only work that runs in another process (an SDK
        worker) starts early; work run here gets None and starts once leased, as it would
        only compete with the commit for the interpreter."""
        assert self._nursery is not None, "slots are reserved only while running"
        early: list[Early[W] | None] = []
        for item in items:
            if self._executor.runs_here(self._route(item)):
                early.append(None)
            else:
                early.append(Early())
                self._nursery.start_soon(self._process, item, early[-1])
        return early

    def settle_early(self, early: Sequence[Early[W] | None], leased: Sequence[W]) -> None:
        """After the commit: what it leased, in the order of the items given to
        `start_early` (those it did not lease are missing at the end). Early items learn
        their fate; the others start now, or free their slot if not leased."""
        for i, started in enumerate(early):
            item = leased[i] if i < len(leased) else None
            if started is not None:
                started.settle(item)  # the early task owns the slot
            elif item is not None:
                self.accept([item])
            else:
                self.unreserve(1)

    async def _hand_over(
        self,
        commit: Callable[[str | None], Awaitable[W | None]],
        expected: W | None = None,
    ) -> W | None:
        """Run a store commit that may lease one item to this processor in its own
        transaction: `commit` gets our owner name if we have a free slot (else None, and it
        leases nothing); the item it returns starts at once, with no lease and no wake-up of
        its own. With `expected`, the item the commit will lease if it succeeds, its work may
        start before the commit (see `start_early`). Shielded: a commit that leased an item
        must reach `accept`."""
        if not self.reserve(1):
            with trio.CancelScope(shield=True):
                return await commit(None)
        early = self.start_early([expected]) if expected is not None else [None]
        item = None
        try:
            with trio.CancelScope(shield=True):
                await _commit_after(self._store, early)
                item = await commit(self._owner)
        finally:
            self.settle_early(early, [] if item is None else [item])
        return item

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        log.info("%s: waiting for new work items...", self.name)
        task_status.started()
        await self._serve_leases(self._wakeup(), self._lease, self._process)

    def _wakeup(self) -> Wakeup:
        raise NotImplementedError

    def _route(self, item: W) -> Route:
        """Where the item goes: what an executor and a worker's filters look at."""
        raise NotImplementedError

    async def _lease(self, limit: int) -> Leased[W]:
        raise NotImplementedError

    async def _step(self, item: W, early: Early[W] | None = None) -> None:
        """Run `item`; with `early`, before the commit that leases it (see `_leased`)."""
        raise NotImplementedError

    @staticmethod
    async def _leased(item: W, early: Early[W] | None) -> W | None:
        """The item as leased: a step started early calls this before it touches the store,
        and stops if its commit leased nothing (the worker's answer is then dropped)."""
        return item if early is None else await early.leased()

    async def _give_back(self, item: W, delay: float) -> None:
        raise NotImplementedError

    def _describe(self, item: W) -> str:
        """The item, for a log line (ids only: payloads are never logged)."""
        raise NotImplementedError

    async def _process(self, item: W, early: Early[W] | None = None) -> None:
        try:
            await self._step(item, early)
        except LockLost as exc:
            # e.g. the instance was purged while its leftover events were being dropped
            log.info("%s: %s; the item is dropped", self.name, exc)
        except Exception as exc:
            # One work item's failure must not stop the hub: log it and retry the item later.
            _log_failure(self.name, self._describe(item), exc)
            leased = await self._leased(item, early)
            if leased is not None:
                await self._give_back(leased, FAILED_STEP_RETRY_SECONDS)
        finally:
            if early is not None:
                early.on_its_way.set()
            self._slots.release()

    async def _release(self, fn: Callable[..., Awaitable[None]], *args: Any, **kw: Any) -> None:
        """Give a lease back (shielded from cancellation); kept for later if the store fails."""
        with trio.CancelScope(shield=True):
            try:
                await fn(*args, **kw)
            except StoreUnavailable:
                self._stranded.append(functools.partial(fn, *args, **kw))
            except LockLost:
                pass  # the item moved on (purged, say): nothing left to give back

    async def _retry_stranded(self) -> bool:
        """Retry kept releases; False while the store still fails."""
        while self._stranded:
            try:
                await self._stranded[0]()
            except StoreUnavailable:
                return False
            except LockLost:
                pass  # the item moved on (purged, say): nothing left to give back
            self._stranded.pop(0)
        return True

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

    async def _serve_leases(
        self,
        wakeup: Wakeup,
        lease: Callable[[int], Awaitable[Leased[W]]],
        process: Callable[[W], Awaitable[None]],
    ) -> None:
        """Lease as many items as there are free slots, process each in a task of its own
        (which frees its slot), sleep until woken when there is nothing to do. While the store
        fails, wait and try again: the store logs the fault, callers get UNAVAILABLE."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._lease_loop(nursery, wakeup, lease, process)
            finally:
                self._nursery = None

    async def _lease_loop(
        self,
        nursery: trio.Nursery,
        wakeup: Wakeup,
        lease: Callable[[int], Awaitable[Leased[W]]],
        process: Callable[[W], Awaitable[None]],
    ) -> None:
        while True:
            if not await self._retry_stranded():
                await trio.sleep(STORE_RETRY_SECONDS)
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
                nursery.start_soon(process, item)
            if len(items) < taken:
                # The store had no more visible work: anything new sets `wakeup` (cleared
                # before the lease), so sleep instead of leasing again to find nothing.
                await _sleep_until_work(wakeup, items.next_at)


async def _commit_after(store: Backend, early: Sequence[Early[Any] | None]) -> None:
    """Wait until the first work started early is on its way to its worker (a turn or two of
    the event loop: the worker's stream was waiting for it), so that the commit beside it
    does not compete with sending it: the worker gets it sooner, and the commit is still
    made long before the worker answers. Not while the store's writer is busy: the commit
    would wait for its turn anyway, and waiting here first only delays it (and whoever waits
    for it, a client's StartInstance say) by those turns of the event loop."""
    first = next((e for e in early if e is not None), None)
    if first is not None and not store.writer_busy() and not first.on_its_way.is_set():
        await first.on_its_way.wait()  # (waiting on a set event would still take a turn)


async def _all_on_their_way(early: Sequence[Early[Any] | None]) -> None:
    """Wait until the work started early is on its way to its workers (a turn of the event
    loop each, for those a worker's stream was waiting for)."""
    for started in early:
        if started is not None and not started.on_its_way.is_set():
            await started.on_its_way.wait()


async def _sleep_until_work(wakeup: Wakeup, next_time: datetime | None) -> None:
    delay = IDLE_POLL_SECONDS
    if next_time is not None:
        delay = min(delay, max(0.0, (next_time - _now()).total_seconds()))
    with trio.move_on_after(delay):
        await wakeup.wait()


class Parking:
    """Instances as their last step's commit left them, while they wait (see
    `OrchestrationProcessor.expected_step`): at most `max_items` of them and `max_events`
    history events in all, the oldest dropped first. Their histories are the store cache's
    own events, but an evicted cache entry would live on here: hence the bound in events."""

    def __init__(self, max_items: int = 1024, max_events: int = 100_000) -> None:
        self._items: collections.OrderedDict[str, OrchestrationWorkItem] = collections.OrderedDict()
        self._events = 0
        self._max_items = max_items
        self._max_events = max_events

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: OrchestrationWorkItem) -> None:
        self.pop(item.state.instance_id)
        if len(item.history) > self._max_events:
            return
        self._items[item.state.instance_id] = item
        self._events += len(item.history)
        while len(self._items) > self._max_items or self._events > self._max_events:
            _, dropped = self._items.popitem(last=False)
            self._events -= len(dropped.history)

    def pop(self, instance_id: str) -> OrchestrationWorkItem | None:
        item = self._items.pop(instance_id, None)
        if item is not None:
            self._events -= len(item.history)
        return item


class Pacing:
    """Fan-in coalescing: while an instance still waits for activities, its next step waits
    for more of their results, at most as long as its last step kept the worker busy (and
    at most `max_hold` seconds), or until all of them are in.

    Every step replays the whole history on the worker, so a fan-out of a thousand
    activities stepped once per result (or per handful of results) spends the worker's time
    replaying a long history again and again instead of running the activities. Bounding the
    wait by the last step's cost keeps the worker's share of time spent on the instance's
    replays at about half at most, and adds little latency where steps are cheap. The
    last step's cost is known only to this process, in memory: after a restart an instance
    steps at once until it has been stepped here.
    """

    def __init__(
        self, *, max_hold: float = 1.0, min_step: float = 0.002, max_items: int = 4096
    ) -> None:
        # instance -> (when its last step's worker answered, how long it took), trio clock
        self._last: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._holds: dict[str, _Hold] = {}
        self._max_hold = max_hold
        self._min_step = min_step
        self._max_items = max_items

    def stepped(self, instance_id: str, answered: float, took: float) -> None:
        """A worker answered a step of the instance at `answered`, `took` seconds after the
        step was sent."""
        self._last.pop(instance_id, None)
        if took >= self._min_step:
            self._last[instance_id] = (answered, min(took, self._max_hold))
            while len(self._last) > self._max_items:
                self._last.popitem(last=False)

    def forget(self, instance_id: str) -> None:
        self._last.pop(instance_id, None)

    def hold_until(self, instance_id: str, now: float) -> float | None:
        """Until when the instance's next step may wait for more results (None: no wait)."""
        last = self._last.get(instance_id)
        if last is None or last[0] + last[1] <= now:
            return None
        return last[0] + last[1]

    @contextlib.contextmanager
    def watch(self, instance_id: str) -> Iterator[_Hold]:
        """Count the instance's activity results delivered from now on (see `_Hold`)."""
        hold = self._holds[instance_id] = _Hold()
        try:
            yield hold
        finally:
            if self._holds.get(instance_id) is hold:
                del self._holds[instance_id]

    def delivered(self, instance_id: str) -> None:
        """An activity result for the instance was committed."""
        hold = self._holds.get(instance_id)
        if hold is not None:
            hold.seen += 1
            hold.check()


@dataclasses.dataclass
class _Hold:
    """The activity results of an instance delivered since it was being watched (`seen`),
    and how many its step waits for (`missing`, once known): `done` once they are in. A
    result committed before the watch began but counted by it makes `done` early, never
    late: the store has the last word (see `OrchestrationProcessor._coalesce`)."""

    seen: int = 0
    missing: int | None = None
    done: trio.Event = dataclasses.field(default_factory=trio.Event)

    def expect(self, missing: int) -> None:
        self.missing = missing
        self.check()

    def check(self) -> None:
        if self.missing is not None and self.seen >= self.missing:
            self.done.set()


class OrchestrationProcessor(Processor[OrchestrationWorkItem]):
    """Runs orchestration steps: plan, execute on a worker, apply, commit."""

    name = "orchestration-processor"
    # The activity processor that takes the activities a commit leases (see `link`).
    activities: Processor[ActivityWorkItem] | None = None

    @functools.cached_property
    def _parked(self) -> Parking:
        """Instances whose last step this processor committed with nothing left in their
        inbox, as that commit left them: what they wait for may start their next step beside
        its delivery."""
        return Parking()

    @functools.cached_property
    def pacing(self) -> Pacing:
        """When a step may wait for more activity results (see `Pacing`)."""
        return Pacing()

    @functools.cached_property
    def _starting(self) -> dict[str, trio.Event]:
        """Instances whose step is starting beside a commit not yet made (see `hand_over`),
        each with the event set once that commit is over."""
        return {}

    async def expected_step(
        self, instance_id: str, execution_id: str, event: pb.HistoryEvent
    ) -> OrchestrationWorkItem | None:
        """The work item a delivery of `event` would lease, if the instance is parked here
        and its step would not wait for more results (else None): what `hand_over` needs to
        start that step beside the delivery.

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
            return None  # it is leased with the delivery and waits there (see `_coalesce`)
        return item

    def _holds_for(self, item: OrchestrationWorkItem) -> float | None:
        """Until when the step of `item` waits for more activity results, if it does."""
        until = self.pacing.hold_until(item.state.instance_id, trio.current_time())
        if until is None or not _running(item.history, item.inbox):
            return None
        return until

    async def _coalesce(self, item: OrchestrationWorkItem) -> OrchestrationWorkItem:
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
                    inbox = await self._store.read_inbox(self._owner, instance_id, _now())
                    running = _running(item.history, inbox)
                    if not running or trio.current_time() >= until:
                        break
                    watch.expect(running)
                    with trio.move_on_at(until):
                        await watch.done.wait()
        except StoreUnavailable:
            pass  # what arrived meanwhile waits for the next step
        except BaseException:
            await self._release(self._store.abandon_orchestration, self._owner, instance_id)
            raise
        return dataclasses.replace(item, inbox=inbox)

    def _wakeup(self) -> Wakeup:
        return self._signals.orchestration_work

    async def _lease(self, limit: int) -> Leased[OrchestrationWorkItem]:
        return await self._store.lease_orchestrations(self._owner, _now(), limit)

    def _describe(self, item: OrchestrationWorkItem) -> str:
        return f"a step of {item.state.instance_id}"

    def _route(self, item: OrchestrationWorkItem) -> Route:
        return Route(ORCHESTRATION, item.state.name, item.state.version)

    async def _step_leased(self, early: Early[OrchestrationWorkItem]) -> None:
        leased = await early.leased()
        if leased is not None:
            await self._step(leased)

    async def _give_back(self, item: OrchestrationWorkItem, delay: float) -> None:
        await self._release(
            self._store.postpone,
            self._owner,
            item.state.instance_id,
            [m.id for m in item.inbox],
            _now() + timedelta(seconds=delay),
            failed=True,
        )

    async def _step(
        self, item: OrchestrationWorkItem, early: Early[OrchestrationWorkItem] | None = None
    ) -> None:
        self._parked.pop(item.state.instance_id)  # its state moves on
        if early is None:
            item = await self._coalesce(item)
        state = item.state
        plan = core.plan_step(state, item.history, item.inbox, _now(), item.attempt)
        if early is not None and not isinstance(plan, core.Dispatch):
            # Nothing for a worker to do early: wait for the lease, then the ordinary way.
            await self._step_leased(early)
            return
        if isinstance(plan, core.Settle):
            await self._store.commit_step(self._owner, plan.result)
            return
        if isinstance(plan, core.Postpone):
            await self._store.postpone(self._owner, state.instance_id, plan.message_ids, plan.until)
            return
        dispatched = trio.current_time()
        try:
            pending = await self._executor.execute_step(
                _step_of(state, plan),
                self._route(item),
                early.on_its_way if early is not None else None,
                functools.partial(_check_step, state, plan),
            )
        except (WorkTooLarge, WorkAbandoned) as exc:
            if early is not None:
                # The failure is handled for the item as leased, if it is leased.
                await self._step_leased(early)
                return
            if isinstance(exc, WorkTooLarge):
                log.warning("%s: %s fails: %s", self.name, state.instance_id, exc)
                failure = ev.failure("WorkItemTooLargeError", str(exc))
                await self._store.commit_step(
                    self._owner, core.fail_undeliverable(state, plan, _now(), failure)
                )
                return
            delay = max(exc.delay, _backoff(item.attempt))
            await self._release(
                self._store.postpone,
                self._owner,
                state.instance_id,
                plan.consumed,
                _now() + timedelta(seconds=delay),
                failed=True,
            )
            return
        except BaseException:
            if await self._leased(item, early) is not None:
                await self._release(
                    self._store.abandon_orchestration, self._owner, state.instance_id
                )
            raise
        answered = trio.current_time()
        self.pacing.stepped(state.instance_id, answered, answered - dispatched)
        result = pending.checked
        assert isinstance(result, core.StepResult)
        if early is not None:
            leased = await early.leased()
            if leased is None or not _same_work(item, leased):
                # Nobody leased what the worker ran (the commit failed, say): its answer is
                # dropped, and a lease of something else runs the ordinary way.
                self._executor.finish(pending)
                if leased is not None:
                    await self._step(leased)
                return
            # The worker ran exactly the leased item: its messages now have the store's ids.
            item = leased
            result = core.evolve(result, consumed=tuple(m.id for m in leased.inbox))
        # The worker is done (its rpc was answered as it delivered the answer): its slot is
        # freed now, not after the commit. The instance stays leased until the commit; if the
        # commit fails, the step runs again, so nothing is lost.
        self._executor.finish(pending)
        try:
            await self._commit(
                item, result, functools.partial(self._store.commit_step, self._owner, result)
            )
        except BaseException as exc:
            await self._release(
                self._store.abandon_orchestration,
                self._owner,
                state.instance_id,
                failed=isinstance(exc, Exception),
            )
            if isinstance(exc, LockLost):
                # the instance was purged or deleted meanwhile
                log.info("%s: a step of %s is dropped: %s", self.name, state.instance_id, exc)
                return
            if isinstance(exc, Exception):
                _log_failure(self.name, f"the commit of a step of {state.instance_id}", exc)
                return
            raise

    async def _commit(
        self,
        item: OrchestrationWorkItem,
        result: core.StepResult,
        commit: Callable[[int], Awaitable[Handed[ActivityWorkItem] | None]],
    ) -> None:
        """Commit the step of `item` that made `result` with `commit(n)`, which leases up to
        `n` of its activities to us, then keep the instance parked if nothing waits for it.

        The activities a step schedules are leased in its own commit, as many as the
        activity processor has room for, and those for SDK workers are sent beside that
        commit instead of after it: an activity's result is delivered only once the commit
        is made (see `ActivityProcessor._step`); if it fails, the step runs again and so do
        they. `commit` returns None if it did not commit the step after all."""
        helper = self.activities
        reserved = helper.reserve(len(result.activities)) if helper is not None else 0
        items = [
            # the row id is the commit's to give (see `_leased`)
            ActivityWorkItem(0, a.instance_id, a.execution_id, a.scheduled, 1)
            for a in result.activities[:reserved]
        ]
        # A fan-out's first activities start alone, the rest once those are on their way:
        # started together, every one is built before the first goes out (20 ms for 256).
        sent = helper.start_early(items[:EARLY_FIRST]) if helper is not None and items else []
        handed: Handed[ActivityWorkItem] | None = None
        try:
            with trio.CancelScope(shield=True):
                if helper is not None and len(items) > len(sent):
                    await _all_on_their_way(sent)
                    sent += helper.start_early(items[len(sent) :])
                await _commit_after(self._store, sent)
                handed = await commit(reserved)
        finally:
            if helper is not None:
                helper.settle_early(sent, handed or [])  # none if the commit failed
                helper.unreserve(len(items) - len(sent))  # never started (what came before failed)
        if handed is None:
            return
        state = item.state
        if result.state.status.is_terminal:
            self.pacing.forget(state.instance_id)
        elif not handed.waiting:
            history = result.history if result.reset_history else [*item.history, *result.history]
            self._parked.put(OrchestrationWorkItem(result.state, history, []))
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

    async def hand_over(
        self,
        commit: Callable[[str | None, StepAhead | None], Awaitable[Committed]],
        expected: OrchestrationWorkItem | None = None,
    ) -> None:
        """Run a store commit that may lease an instance to us (its creation, an activity's
        result): `commit(lease_to, ahead)` leases it to `lease_to` if given (see
        `Processor._hand_over`: with a free slot, its step then starts at once, with no lease
        and no wake-up of its own). `expected`: the work item the commit would lease, if it
        would start a step now.

        If that step runs in this process, it runs first, and `commit` gets it as `ahead`
        to commit in the same transaction (one commit instead of two, and no lease); if the
        instance changed meanwhile, the store drops the step and commits the ordinary way.
        If it runs on an SDK worker, it is sent to the worker beside the commit instead."""

        async def plain(lease_to: str | None) -> OrchestrationWorkItem | None:
            done = await commit(lease_to, None)
            assert not isinstance(done, Handed)
            return done

        if expected is None:
            await self._hand_over(plain)
            return
        instance_id = expected.state.instance_id
        starting = self._starting[instance_id] = trio.Event()  # see `expected_step`
        try:
            if self._executor.runs_here(self._route(expected)):
                result = await self._run_ahead(expected)
                if result is not None:
                    await self._commit_ahead(commit, expected, result)
                    return
                await self._hand_over(plain)  # the ordinary step handles what went wrong
            else:
                await self._hand_over(plain, expected)
        finally:
            if self._starting.get(instance_id) is starting:
                del self._starting[instance_id]
            starting.set()

    async def _run_ahead(self, item: OrchestrationWorkItem) -> core.StepResult | None:
        """The step of `item` (not leased) run here, or None if it cannot run this way."""
        state = item.state
        plan = core.plan_step(state, item.history, item.inbox, _now(), item.attempt)
        if not isinstance(plan, core.Dispatch):
            return None
        dispatched = trio.current_time()
        try:
            pending = await self._executor.execute_step(
                _step_of(state, plan),
                self._route(item),
                None,
                functools.partial(_check_step, state, plan),
            )
        except Exception:
            return None
        result = pending.checked
        assert isinstance(result, core.StepResult)
        self._executor.finish(pending)
        answered = trio.current_time()
        self.pacing.stepped(state.instance_id, answered, answered - dispatched)
        return core.evolve(result, consumed=())  # nothing came through the inbox

    async def _commit_ahead(
        self,
        commit: Callable[[str | None, StepAhead | None], Awaitable[Committed]],
        item: OrchestrationWorkItem,
        result: core.StepResult,
    ) -> None:
        """Commit `result`, the step of `item` run ahead, with `commit`; if the store took
        the ordinary way instead and leased the instance to us, its step starts now."""
        slot = self.reserve(1)  # for the lease of the ordinary way, if the store takes it
        leased: OrchestrationWorkItem | None = None

        async def commit_step(reserved: int) -> Handed[ActivityWorkItem] | None:
            nonlocal leased
            ahead = StepAhead(result, item.state.last_updated_at, self._owner, reserved)
            done = await commit(self._owner if slot else None, ahead)
            if isinstance(done, Handed):
                return done
            leased = done
            return None

        try:
            await self._commit(item, result, commit_step)
        finally:
            if leased is not None:
                self.accept([leased])
            elif slot:
                self.unreserve(1)


def _step_of(state: InstanceState, plan: core.Dispatch) -> OrchestrationStep:
    return OrchestrationStep(
        state.instance_id,
        state.execution_id,
        plan.past_events,
        plan.new_events,
        state.trace_context,
    )


class ActivityProcessor(Processor[ActivityWorkItem]):
    """Runs activities on workers and delivers their results to the orchestrations."""

    name = "activity-processor"
    # The orchestration processor that takes the steps a completion leases (see `link`).
    orchestrations: OrchestrationProcessor | None = None

    def __init__(
        self,
        store: Backend,
        executor: Executor,
        signals: Signals,
        owner: str,
        max_in_flight: int = 1024,
        max_attempts: int = MAX_ACTIVITY_ATTEMPTS,
    ) -> None:
        super().__init__(store, executor, signals, owner, max_in_flight)
        self._max_attempts = max_attempts

    def _wakeup(self) -> Wakeup:
        return self._signals.activity_work

    async def _lease(self, limit: int) -> Leased[ActivityWorkItem]:
        return await self._store.lease_activities(self._owner, _now(), limit)

    def _describe(self, item: ActivityWorkItem) -> str:
        return f"activity {item.scheduled.eventId} of {item.instance_id}"

    def _route(self, item: ActivityWorkItem) -> Route:
        scheduled = item.scheduled.taskScheduled
        return Route(ACTIVITY, scheduled.name, ev.opt_str(scheduled, "version"))

    async def _give_back(self, item: ActivityWorkItem, delay: float) -> None:
        await self._release(self._store.abandon_activity, self._owner, item, delay, failed=True)

    async def _not_run(self, item: ActivityWorkItem, exc: BaseException) -> None:
        """Settle a leased activity no worker answered; `exc` says why."""
        if isinstance(exc, WorkTooLarge):
            log.warning("%s: %s fails: %s", item.instance_id, self._describe(item), exc)
            failure = ev.failure("WorkItemTooLargeError", str(exc))
            await self._store.complete_activity(
                self._owner, item, ev.task_failed(_now(), item.scheduled.eventId, failure)
            )
        elif isinstance(exc, WorkAbandoned):
            delay = max(exc.delay, _backoff(item.dequeue_count))
            await self._release(self._store.abandon_activity, self._owner, item, delay, failed=True)
        else:  # cancelled: the hub is stopping, the activity was not tried
            await self._release(self._store.abandon_activity, self._owner, item, 0.0)

    async def _step(
        self, item: ActivityWorkItem, early: Early[ActivityWorkItem] | None = None
    ) -> None:
        scheduled = item.scheduled.taskScheduled
        if item.dequeue_count > self._max_attempts:
            # Handed out again and again without an answer: its worker crashes on it or gives
            # it back each time. Fail the task so the orchestration (and its retry policy)
            # decides, instead of cycling forever.
            failure = ev.failure(
                "ActivityAbandonedError",
                f"activity '{scheduled.name}' (task {item.scheduled.eventId}) was handed to "
                f"workers {item.dequeue_count - 1} times without an answer",
                non_retriable=False,
            )
            log.warning("%s: %s", item.instance_id, failure.errorMessage)
            await self._store.complete_activity(
                self._owner, item, ev.task_failed(_now(), item.scheduled.eventId, failure)
            )
            return
        work_item = pb.WorkItem()
        request = work_item.activityRequest
        request.name = scheduled.name
        request.taskId = item.scheduled.eventId
        if scheduled.HasField("version"):
            request.version.CopyFrom(scheduled.version)
        if scheduled.HasField("input"):
            request.input.CopyFrom(scheduled.input)
        if scheduled.HasField("parentTraceContext"):
            request.parentTraceContext.CopyFrom(scheduled.parentTraceContext)
        request.tags.update(scheduled.tags)
        request.orchestrationInstance.instanceId = item.instance_id
        request.orchestrationInstance.executionId.value = item.execution_id
        try:
            pending = await self._executor.execute(
                work_item,
                self._route(item),
                early.on_its_way if early is not None else None,
                functools.partial(_check_activity_result, request),
            )
        except BaseException as exc:
            # Started early, the activity is touched in the store only as its step's commit
            # wrote it, and only if that commit was made.
            leased = await self._leased(item, early)
            if leased is not None:
                await self._not_run(leased, exc)
            if not isinstance(exc, (WorkTooLarge, WorkAbandoned)):
                raise
            return
        response = pending.checked
        assert isinstance(response, pb.ActivityResponse)
        # The worker is done (its rpc was answered as it delivered the result, as
        # durabletask-go does): its slot is freed now, not after the commit. The activity
        # stays leased until the commit; if the commit fails, the activity is handed out
        # again, so nothing is lost.
        self._executor.finish(pending)
        leased = await self._leased(item, early)
        if leased is None:
            log.info(
                "%s: the result of %s is dropped: the step that scheduled it was not committed",
                item.instance_id,
                self._describe(item),
            )
            return
        item = leased
        result = core.activity_result(response, _now())

        async def complete(lease_to: str | None, ahead: StepAhead | None) -> Committed:
            return await self._store.complete_activity(
                self._owner, item, result, lease_orchestration=lease_to is not None, ahead=ahead
            )

        try:
            if self.orchestrations is not None:
                # The orchestration, if idle, is leased in the same commit that delivers the
                # result and its step starts at once, or runs before it and is committed in
                # it; if it waits parked, its step starts beside this commit.
                expected = await self.orchestrations.expected_step(
                    item.instance_id, item.execution_id, result
                )
                await self.orchestrations.hand_over(complete, expected)
                self.orchestrations.pacing.delivered(item.instance_id)
            else:
                with trio.CancelScope(shield=True):
                    await complete(None, None)
        except LockLost:
            raise  # the activity row is gone (its instance was purged): nothing to give back
        except Exception as exc:
            _log_failure(self.name, f"the result of {self._describe(item)}", exc)
            await self._release(self._store.abandon_activity, self._owner, item, 0.0, failed=True)


def _check_step(state: InstanceState, plan: core.Dispatch, response: object) -> core.StepResult:
    """An orchestrator's answer to the step `plan` of `state`, as that step's result; run as
    the worker delivers it (see `RemoteExecutor.complete`)."""
    assert isinstance(response, pb.OrchestratorResponse)
    if response.instanceId != state.instance_id:
        raise InvalidRequest(
            f"the response names instance '{response.instanceId}', but its completion token "
            f"belongs to instance '{state.instance_id}'"
        )
    return core.apply_response(state, plan, response, _now(), _new_id)


def _check_activity_result(request: pb.ActivityRequest, response: object) -> pb.ActivityResponse:
    """A worker's result for the activity `request`, if it is that activity's."""
    assert isinstance(response, pb.ActivityResponse)
    instance_id = request.orchestrationInstance.instanceId
    if response.instanceId != instance_id or response.taskId != request.taskId:
        raise InvalidRequest(
            f"the completion names instance '{response.instanceId}' task {response.taskId}, "
            f"but its token belongs to instance '{instance_id}' task {request.taskId}"
        )
    return response


def _running(history: Sequence[pb.HistoryEvent], inbox: Sequence[InboxMessage]) -> int:
    """How many of the activities in `history` have no result yet, in it or in `inbox`."""
    return core.running_activities(itertools.chain(history, (m.event for m in inbox)))


def _same_work(ran: OrchestrationWorkItem, leased: OrchestrationWorkItem) -> bool:
    """Whether a step started early ran on what its commit leased (message ids aside)."""
    return (
        ran.state == leased.state
        and ran.attempt == leased.attempt
        and ran.history == leased.history
        and [m.event for m in ran.inbox] == [m.event for m in leased.inbox]
    )


def link(orchestrations: OrchestrationProcessor, activities: ActivityProcessor) -> None:
    """Let each processor hand work it leases in its own commits to the other."""
    orchestrations.activities = activities
    activities.orchestrations = orchestrations


class EntityProcessor(Processor[EntityWorkItem]):
    """Runs entity batches: settle locks, run the operations on a worker, commit the result."""

    name = "entity-processor"

    def _wakeup(self) -> Wakeup:
        return self._signals.entity_work

    async def _lease(self, limit: int) -> Leased[EntityWorkItem]:
        return await self._store.lease_entities(self._owner, _now(), limit)

    def _describe(self, item: EntityWorkItem) -> str:
        return f"a batch of {item.entity.instance_id}"

    def _route(self, item: EntityWorkItem) -> Route:
        return Route(ENTITY, core.entity_name(item.entity.instance_id))

    async def _give_back(self, item: EntityWorkItem, delay: float) -> None:
        await self._release(
            self._store.postpone_entity,
            self._owner,
            item.entity.instance_id,
            [m.id for m in item.inbox],
            _now() + timedelta(seconds=delay),
            failed=True,
        )

    async def _step(self, item: EntityWorkItem, early: Early[EntityWorkItem] | None = None) -> None:
        assert early is None, "entity batches are leased before they run"
        entity_id = item.entity.instance_id
        batch = core.plan_entity_batch(item.entity, item.inbox, _now())
        if not batch.operations:
            await self._store.commit_entity(self._owner, core.settle_entity(batch))
            return
        if item.attempt > core.MAX_STEP_ATTEMPTS:
            reason = (
                f"a batch of {len(batch.operations)} operation(s) on entity '{entity_id}' was "
                f"handed out {item.attempt - 1} times and never completed (its worker crashed, "
                "failed the batch or gave it back each time)"
            )
            log.warning("%s: %s", self.name, reason)
            await self._store.commit_entity(
                self._owner, core.fail_entity_batch(batch, _now(), reason)
            )
            return
        ids = [m.id for m in batch.operations]
        try:
            pending = await self._executor.execute(
                pb.WorkItem(entityRequestV2=core.entity_request(batch)),
                self._route(item),
            )
        except WorkTooLarge as exc:
            log.warning("%s: a batch of %s fails: %s", self.name, entity_id, exc)
            await self._store.commit_entity(
                self._owner, core.fail_entity_batch(batch, _now(), str(exc))
            )
            return
        except WorkAbandoned as abandoned:
            later = _now() + timedelta(seconds=max(abandoned.delay, _backoff(item.attempt)))
            await self._release(
                self._store.postpone_entity, self._owner, entity_id, ids, later, failed=True
            )
            return
        except BaseException:
            await self._release(self._store.postpone_entity, self._owner, entity_id, ids, _now())
            raise
        response = pending.response
        assert isinstance(response, pb.EntityBatchResult)
        try:
            result = core.apply_entity_result(batch, response, _now(), _new_id)
            with trio.CancelScope(shield=True):
                await self._store.commit_entity(self._owner, result)
        except core.InvalidEntityResult as exc:
            # The batch runs again from the state before it, handed out again at once; a
            # worker that keeps failing it reaches the poison limit above.
            self._executor.finish(pending, InvalidRequest(f"entity '{entity_id}': {exc}"))
            log.warning(
                "'%s': a worker's answer to an entity batch is refused, and the item handed "
                "out again: %s",
                escaped(entity_id),
                escaped(str(exc), 1000),
            )
            later = _now() + timedelta(seconds=_backoff(item.attempt))
            await self._release(
                self._store.postpone_entity, self._owner, entity_id, ids, later, failed=True
            )
            return
        except BaseException as exc:
            self._executor.finish(pending, exc if isinstance(exc, Exception) else None)
            raise
        self._executor.finish(pending)
