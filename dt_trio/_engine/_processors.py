"""The orchestration, activity and entity processors: lease work, plan, execute, apply.

Each processor serves one lane of the dispatcher (`_dispatch.py`): the lane leases while it
has room and a worker for its kind, runs each item in a task of its own and sleeps until a
commit wakes it (`Signals`) or until the earliest future message (a timer, a scheduled start)
becomes visible. What a processor does with one item is a straight line; work handed to it by
another commit, started early or run ahead is the dispatcher's business.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Generic, TypeVar

import trio

from dt_trio import _core as core
from dt_trio._core import _events as ev
from dt_trio._core import _operations as ops
from dt_trio._core._commit import (
    ActivityWorkItem,
    Attempts,
    Commit,
    EntityWorkItem,
    OrchestrationWorkItem,
    WorkKind,
)
from dt_trio._engine._dispatch import Dispatcher, Early, Lane, leased, route_of
from dt_trio._engine._dispatch import utc_now as _now
from dt_trio._engine._executor import WorkAbandoned, WorkTooLarge, WorkUnclaimed, escaped
from dt_trio._engine._signals import Signals, Wakeup
from dt_trio._errors import InvalidRequest, LockLost, StoreUnavailable
from dt_trio._log import get_logger
from dt_trio._metrics._tally import Attempted
from dt_trio._proto import orchestrator_service_pb2 as pb
from dt_trio._store import Leased

log = get_logger(__name__)
W = TypeVar("W", bound=Attempted)

# An activity handed out this many times without an answer fails its task.
MAX_ACTIVITY_ATTEMPTS = 10
# A step that failed unexpectedly is tried again after this long.
FAILED_STEP_RETRY_SECONDS = 5.0


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


def _later(seconds: float) -> datetime:
    return _now() + timedelta(seconds=seconds)


def _retry_later(item: OrchestrationWorkItem | EntityWorkItem) -> Commit:
    """The release of an instance or an entity whose step failed unexpectedly: its messages
    are tried again later, the failure counted."""
    ids = [m.id for m in item.inbox]
    return ops.release(item, _now(), Attempts.COUNT, ids, _later(FAILED_STEP_RETRY_SECONDS))


class _Processor(Generic[W]):
    """What the three processors share: serving their lane, and what happens to an item whose
    step fails unexpectedly (logged, and given back to be tried again later)."""

    name = "processor"

    def __init__(
        self,
        dispatch: Dispatcher,
        signals: Signals,
        lane: Lane[W],
        wakeup: Wakeup,
        lease: Callable[[str, datetime, int], Awaitable[Leased[W]]],
    ) -> None:
        """`lane` is the processor's lane of `dispatch`; `wakeup` the signal of its kind of work;
        `lease` the store's lease of its kind (owner, now, limit)."""
        self._dispatch = dispatch
        self._store = dispatch.store
        self._executor = dispatch.executor
        self._owner = dispatch.owner
        self._signals = signals
        self._tally = signals.tally
        self._lane = lane
        self._wakeup = wakeup
        self._lease = lease

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        log.info("%s: waiting for new work items...", self.name)
        task_status.started()
        await self._lane.serve(self._lease_counted, self._process, self._wakeup)

    async def _lease_counted(self, limit: int) -> Leased[W]:
        leased = await self._lease(self._owner, _now(), limit)
        self._tally.leased(self._lane.kind, leased)
        return leased

    async def _step(self, item: W, early: Early[W] | None) -> None:
        """Run `item`; with `early`, before the commit that leases it (see `leased`)."""
        raise NotImplementedError

    def _give_back_failed(self, item: W) -> Commit:
        """The release of an item whose step failed unexpectedly (tried again later)."""
        raise NotImplementedError

    def _describe(self, item: W) -> str:
        """The item, for a log line (ids only: payloads are never logged)."""
        raise NotImplementedError

    async def _process(self, item: W, early: Early[W] | None) -> None:
        try:
            await self._step(item, early)
        except LockLost as exc:
            # e.g. the instance was purged while its leftover events were being dropped
            log.info("%s: %s; the item is dropped", self.name, exc)
        except Exception as exc:
            # One work item's failure must not stop the hub: log it and retry the item later.
            _log_failure(self.name, self._describe(item), exc)
            held = await leased(item, early)
            if held is not None:
                await self._lane.give_back(self._give_back_failed(held))


class OrchestrationProcessor(_Processor[OrchestrationWorkItem]):
    """Runs orchestration steps: plan, execute on a worker, apply, commit."""

    name = "orchestration-processor"

    def __init__(self, dispatch: Dispatcher, signals: Signals) -> None:
        super().__init__(
            dispatch,
            signals,
            dispatch.orchestrations,
            signals.orchestration_work,
            dispatch.store.lease_orchestrations,
        )

    def _describe(self, item: OrchestrationWorkItem) -> str:
        return f"a step of {item.state.instance_id}"

    def _give_back_failed(self, item: OrchestrationWorkItem) -> Commit:
        return _retry_later(item)

    async def _step_leased(self, early: Early[OrchestrationWorkItem]) -> None:
        item = await early.leased()
        if item is not None:
            await self._step(item, None)

    async def _step(
        self, item: OrchestrationWorkItem, early: Early[OrchestrationWorkItem] | None
    ) -> None:
        self._dispatch.unpark(item.state.instance_id)  # its state moves on
        if early is None:
            item = await self._dispatch.coalesce(item)
        state = item.state
        plan = core.plan_step(state, item.history, item.inbox, _now(), item.attempt)
        if early is not None and not isinstance(plan, core.Dispatch):
            # Nothing for a worker to do early: wait for the lease, then the ordinary way.
            await self._step_leased(early)
            return
        if isinstance(plan, core.Settle):
            await self._dispatch.commit_step(item, plan.result)
            if core.poisoned(state, item.attempt):
                self._tally.poisoned[WorkKind.ORCHESTRATION] += 1
            return
        if isinstance(plan, core.Postpone):
            release = ops.release(item, _now(), Attempts.RESET, plan.message_ids, plan.until)
            await self._store.apply(release)
            return
        on_its_way = early.on_its_way if early is not None else None
        try:
            answer = await self._dispatch.execute_step(item, plan, on_its_way)
        except (WorkTooLarge, WorkAbandoned, WorkUnclaimed) as exc:
            if early is not None:
                # The failure is handled for the item as leased, if it is leased.
                await self._step_leased(early)
            else:
                await self._not_run(item, plan, exc)
            return
        except BaseException:
            held = await leased(item, early)
            if held is not None:
                await self._lane.give_back(ops.release(held, _now(), Attempts.KEEP))
            raise
        result = answer.checked
        assert isinstance(result, core.StepResult)
        if early is not None:
            held = await early.leased()
            if held is None or not _same_work(item, held):
                # Nobody leased what the worker ran (the commit failed, say): its answer is
                # dropped, and a lease of something else runs the ordinary way.
                self._executor.finish(answer)
                if held is not None:
                    await self._step(held, None)
                return
            # The worker ran exactly the leased item: its messages now have the store's ids.
            item = held
            result = core.evolve(result, consumed=tuple(m.id for m in held.inbox))
        # The worker is done (its rpc was answered as it delivered the answer): its slot is
        # freed now, not after the commit. The instance stays leased until the commit; if the
        # commit fails, the step runs again, so nothing is lost.
        self._executor.finish(answer)
        try:
            await self._dispatch.commit_step(item, result)
        except BaseException as exc:
            failed = Attempts.COUNT if isinstance(exc, Exception) else Attempts.KEEP
            await self._lane.give_back(ops.release(item, _now(), failed))
            if isinstance(exc, LockLost):
                # the instance was purged or deleted meanwhile
                log.info(
                    "%s: a step of %s is dropped: %s",
                    self.name,
                    state.instance_id,
                    exc,
                    extra={"instance_id": state.instance_id},
                )
                return
            if isinstance(exc, Exception):
                _log_failure(self.name, f"the commit of a step of {state.instance_id}", exc)
                return
            raise

    async def _not_run(
        self, item: OrchestrationWorkItem, plan: core.Dispatch, exc: Exception
    ) -> None:
        """A leased step no worker answered; `exc` says why."""
        state = item.state
        if isinstance(exc, WorkTooLarge):
            log.warning(
                "%s: %s fails: %s",
                self.name,
                state.instance_id,
                exc,
                extra={"instance_id": state.instance_id},
            )
            failure = ev.failure("WorkItemTooLargeError", str(exc))
            await self._dispatch.commit_step(
                item, core.fail_undeliverable(state, plan, _now(), failure)
            )
        elif isinstance(exc, WorkUnclaimed):
            await self._lane.give_back(ops.release(item, _now(), Attempts.KEEP))
        else:
            assert isinstance(exc, WorkAbandoned)
            delay = max(exc.delay, _backoff(item.attempt))
            release = ops.release(item, _now(), Attempts.COUNT, plan.consumed, _later(delay))
            await self._lane.give_back(release)


def _same_work(ran: OrchestrationWorkItem, held: OrchestrationWorkItem) -> bool:
    """Whether a step started early ran on what its commit leased (message ids aside)."""
    return (
        ran.state == held.state
        and ran.attempt == held.attempt
        and ran.history == held.history
        and [m.event for m in ran.inbox] == [m.event for m in held.inbox]
    )


class ActivityProcessor(_Processor[ActivityWorkItem]):
    """Runs activities on workers and delivers their results to the orchestrations."""

    name = "activity-processor"

    def __init__(
        self,
        dispatch: Dispatcher,
        signals: Signals,
        max_attempts: int = MAX_ACTIVITY_ATTEMPTS,
    ) -> None:
        super().__init__(
            dispatch,
            signals,
            dispatch.activities,
            signals.activity_work,
            dispatch.store.lease_activities,
        )
        self._max_attempts = max_attempts

    def _describe(self, item: ActivityWorkItem) -> str:
        return f"activity {item.scheduled.eventId} of {item.instance_id}"

    def _give_back_failed(self, item: ActivityWorkItem) -> Commit:
        return ops.release_activity(item, _now(), Attempts.COUNT, _later(FAILED_STEP_RETRY_SECONDS))

    async def _fail(self, item: ActivityWorkItem, failure: pb.TaskFailureDetails) -> None:
        """Fail the activity without running it (no worker will)."""
        await self._dispatch.deliver(item, ev.task_failed(_now(), item.scheduled.eventId, failure))
        self._tally.activity_done(item.scheduled.taskScheduled.name, True, None)

    async def _not_run(self, item: ActivityWorkItem, exc: BaseException) -> None:
        """A leased activity no worker answered; `exc` says why."""
        if isinstance(exc, WorkTooLarge):
            log.warning(
                "%s: %s fails: %s",
                item.instance_id,
                self._describe(item),
                exc,
                extra={"instance_id": item.instance_id},
            )
            await self._fail(item, ev.failure("WorkItemTooLargeError", str(exc)))
        elif isinstance(exc, WorkAbandoned):
            delay = max(exc.delay, _backoff(item.attempt))
            await self._lane.give_back(
                ops.release_activity(item, _now(), Attempts.COUNT, _later(delay))
            )
        else:  # unclaimed, or cancelled (the hub is stopping): the activity was not tried
            await self._lane.give_back(ops.release_activity(item, _now(), Attempts.KEEP))

    async def _step(self, item: ActivityWorkItem, early: Early[ActivityWorkItem] | None) -> None:
        scheduled = item.scheduled.taskScheduled
        if item.attempt > self._max_attempts:
            # Handed out again and again without an answer: its worker crashes on it or gives
            # it back each time. Fail the task so the orchestration (and its retry policy)
            # decides, instead of cycling forever.
            failure = ev.failure(
                "ActivityAbandonedError",
                f"activity '{scheduled.name}' (task {item.scheduled.eventId}) was handed to "
                f"workers {item.attempt - 1} times without an answer",
                non_retriable=False,
            )
            log.warning(
                "%s: %s",
                item.instance_id,
                failure.errorMessage,
                extra={"instance_id": item.instance_id},
            )
            await self._fail(item, failure)
            self._tally.poisoned[WorkKind.ACTIVITY] += 1
            return
        work_item = _activity_work_item(item)
        request = work_item.activityRequest
        started = time.perf_counter()
        try:
            answer = await self._executor.execute(
                work_item,
                route_of(item),
                early.on_its_way if early is not None else None,
                functools.partial(_check_activity_result, request),
            )
        except BaseException as exc:
            # Started early, the activity is touched in the store only as its step's commit
            # wrote it, and only if that commit was made.
            held = await leased(item, early)
            if held is not None:
                await self._not_run(held, exc)
            if not isinstance(exc, (WorkTooLarge, WorkAbandoned, WorkUnclaimed)):
                raise
            return
        response = answer.checked
        assert isinstance(response, pb.ActivityResponse)
        seconds = time.perf_counter() - started
        # The worker is done (its rpc was answered as it delivered the result, as
        # durabletask-go does): its slot is freed now, not after the commit. The activity
        # stays leased until the commit; if the commit fails, the activity is handed out
        # again, so nothing is lost.
        self._executor.finish(answer)
        held = item if early is None else await early.leased()
        if held is None:
            log.info(
                "%s: the result of %s is dropped: the step that scheduled it was not committed",
                item.instance_id,
                self._describe(item),
                extra={"instance_id": item.instance_id},
            )
            return
        try:
            await self._dispatch.deliver(held, core.activity_result(response, _now()))
        except LockLost:
            raise  # the activity row is gone (its instance was purged): nothing to give back
        except Exception as exc:
            _log_failure(self.name, f"the result of {self._describe(held)}", exc)
            await self._lane.give_back(ops.release_activity(held, _now(), Attempts.COUNT))
            return
        self._tally.activity_done(request.name, response.HasField("failureDetails"), seconds)


def _activity_work_item(item: ActivityWorkItem) -> pb.WorkItem:
    # Built in place: a message passed to a constructor is copied.
    work_item = pb.WorkItem()
    scheduled = item.scheduled.taskScheduled
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
    return work_item


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


class EntityProcessor(_Processor[EntityWorkItem]):
    """Runs entity batches: grants and releases locks, runs the operations on a worker, commits
    the result."""

    name = "entity-processor"

    def __init__(self, dispatch: Dispatcher, signals: Signals) -> None:
        super().__init__(
            dispatch, signals, dispatch.entities, signals.entity_work, dispatch.store.lease_entities
        )

    def _describe(self, item: EntityWorkItem) -> str:
        return f"a batch of {item.entity.instance_id}"

    def _give_back_failed(self, item: EntityWorkItem) -> Commit:
        return _retry_later(item)

    async def _step(self, item: EntityWorkItem, early: Early[EntityWorkItem] | None) -> None:
        assert early is None, "entity batches are leased before they run"
        entity_id = item.entity.instance_id
        batch = core.plan_entity_batch(item.entity, item.inbox, _now())
        if not batch.operations:
            await self._store.apply(ops.entity_step(item, core.settle_entity(batch), _now()))
            return
        if item.attempt > core.MAX_STEP_ATTEMPTS:
            reason = (
                f"a batch of {len(batch.operations)} operation(s) on entity '{entity_id}' was "
                f"handed out {item.attempt - 1} times and never completed (its worker crashed, "
                "failed the batch or gave it back each time)"
            )
            log.warning("%s: %s", self.name, reason)
            failed = core.fail_entity_batch(batch, _now(), reason)
            await self._store.apply(ops.entity_step(item, failed, _now()))
            self._tally.poisoned[WorkKind.ENTITY] += 1
            return
        ids = [m.id for m in batch.operations]
        try:
            answer = await self._executor.execute(
                pb.WorkItem(entityRequestV2=core.entity_request(batch)), route_of(item)
            )
        except WorkTooLarge as exc:
            log.warning("%s: a batch of %s fails: %s", self.name, entity_id, exc)
            failed = core.fail_entity_batch(batch, _now(), str(exc))
            await self._store.apply(ops.entity_step(item, failed, _now()))
            return
        except WorkAbandoned as abandoned:
            later = _later(max(abandoned.delay, _backoff(item.attempt)))
            await self._lane.give_back(ops.release(item, _now(), Attempts.COUNT, ids, later))
            return
        except WorkUnclaimed:
            await self._lane.give_back(ops.release(item, _now(), Attempts.KEEP))
            return
        except BaseException:
            # cancelled (the hub is stopping): the batch was not tried
            await self._lane.give_back(ops.release(item, _now(), Attempts.KEEP))
            raise
        response = answer.response
        assert isinstance(response, pb.EntityBatchResult)
        try:
            result = core.apply_entity_result(batch, response, _now(), _new_id)
            with trio.CancelScope(shield=True):
                await self._store.apply(ops.entity_step(item, result, _now()))
        except core.InvalidEntityResult as exc:
            # The batch runs again from the state before it, handed out again at once; a
            # worker that keeps failing it reaches the poison limit above.
            self._executor.finish(answer, InvalidRequest(f"entity '{entity_id}': {exc}"))
            log.warning(
                "'%s': a worker's answer to an entity batch is refused, and the item handed "
                "out again: %s",
                escaped(entity_id),
                escaped(str(exc), 1000),
                extra={"instance_id": entity_id},
            )
            later = _later(_backoff(item.attempt))
            await self._lane.give_back(ops.release(item, _now(), Attempts.COUNT, ids, later))
            return
        except BaseException as exc:
            self._executor.finish(answer, exc if isinstance(exc, Exception) else None)
            raise
        self._executor.finish(answer)


def _new_id() -> str:
    return uuid.uuid4().hex
