"""The store interface: what the engine and the gRPC service need from persistence.

Processors and rpc handlers only ever see this protocol and its value types; SQL lives in the
implementations. All methods are async and safe to call concurrently.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

import trio

from dt_trio._core import (
    EntityState,
    EntityStepResult,
    InboxMessage,
    InstanceState,
    Status,
    StepResult,
)
from dt_trio._proto import orchestrator_service_pb2 as pb

W = TypeVar("W")


class Leased(list[W]):
    """What a lease took, and, when it took fewer than it was allowed, `next_at`: the earliest
    time a message that is not visible yet becomes visible (None: no such message). Found in
    the lease's own transaction, so a processor with nothing to do knows how long to sleep
    without asking the store again."""

    next_at: datetime | None = None


class Handed(list[W]):
    """The activities a step's commit leased to its owner (a hand-over), and whether
    `waiting`: the instance has inbox events the orchestration processor will lease."""

    waiting: bool = False


@dataclass(frozen=True)
class OrchestrationWorkItem:
    """A leased instance: its row, committed history and the visible inbox. `attempt` is 1
    plus the attempts at its next step that failed (see `Backend.postpone`)."""

    state: InstanceState
    history: list[pb.HistoryEvent]
    inbox: list[InboxMessage]
    attempt: int = 1


@dataclass(frozen=True)
class StepAhead:
    """The step of an instance that a commit would lease it for (a creation, an activity's
    result), run before that commit and committed in it, when the instance is as the step
    found it (see `Backend.create_instance`, `Backend.complete_activity`): its `result`,
    and how many of its activities to lease to `owner` in the same commit (a hand-over).
    `found_update`: when the instance the step ran on was last updated."""

    result: StepResult
    found_update: datetime
    owner: str
    lease_activities: int = 0


@dataclass(frozen=True)
class ActivityWorkItem:
    """A leased activity. `scheduled` is its TaskScheduled event (eventId = task id);
    `dequeue_count` is this attempt's number: 1 plus the attempts that failed."""

    id: int
    instance_id: str
    execution_id: str
    scheduled: pb.HistoryEvent
    dequeue_count: int


@dataclass(frozen=True)
class EntityWorkItem:
    """A leased entity: its row and its whole visible queue (deferred messages included, as
    they keep their place in the order). `attempt` is 1 plus the failed attempts since its
    last commit."""

    entity: EntityState
    inbox: list[InboxMessage]
    attempt: int = 1


@dataclass(frozen=True)
class EntityFilter:
    """Which entities QueryEntities returns; None means "any"."""

    id_prefix: str | None = None
    modified_from: datetime | None = None
    modified_to: datetime | None = None  # exclusive
    include_transient: bool = False  # entities without state (locked or with queued messages)


@dataclass(frozen=True)
class InstanceFilter:
    """Which instances a query or a purge is about; None means "any"."""

    statuses: frozenset[Status] | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None  # exclusive
    id_prefix: str | None = None


# A keyset page position: (time in microseconds, instance id) of the last row already returned.
PageKey = tuple[int, str]


class StoreListener(Protocol):
    """Told about every commit that changes what the processors or waiters should look at."""

    def orchestration_work_added(self) -> None: ...
    def activity_work_added(self) -> None: ...
    def entity_work_added(self) -> None: ...
    def instance_changed(self, instance_id: str, state: InstanceState | None = None) -> None:
        """`state`: the instance's new state, when the commit knows it."""

    def any_instance_changed(self) -> None:
        """Any instance may have changed (news from another sidecar was lost, or named too
        many instances): whoever waits for one reads it again."""


class Backend(Protocol):
    """A durable task hub store."""

    description: str

    async def open(self) -> None:
        """Create the schema if needed and release leases left by a previous process."""

    async def close(self) -> None: ...

    async def run_writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Commit queued writes until cancelled, then what is still queued (a hub runs it
        beside everything that writes, and stops it last). Without it, writes still work:
        their callers commit them."""

    def writer_busy(self) -> bool:
        """Whether commits are running or queued: a write queued now waits for them."""

    # -- instances -----------------------------------------------------------------------

    async def create_instance(
        self,
        state: InstanceState,
        started: pb.HistoryEvent,
        visible_at: datetime,
        replaceable: Collection[Status] | None = None,
        lease_to: str | None = None,
        ahead: StepAhead | None = None,
    ) -> OrchestrationWorkItem | Handed[ActivityWorkItem] | None:
        """Create an instance with its ExecutionStarted message.

        An existing instance is replaced when its status is in `replaceable` (default: any
        terminal status); otherwise `InstanceExists` is raised and nothing changes. With
        `lease_to`, an instance that can start now is leased to that owner in the same
        transaction and returned as a work item (a hand-over: no lease of its own). With
        `ahead`, its first step run on the ExecutionStarted message, an instance that can
        start now is created with that step committed instead (no message, no lease), and
        the activities the step leased are returned.
        """

    async def get_instance(self, instance_id: str) -> InstanceState | None: ...

    async def get_history(self, instance_id: str) -> list[pb.HistoryEvent]: ...

    async def enqueue(self, instance_id: str, event: pb.HistoryEvent, visible_at: datetime) -> None:
        """Put an event into an instance's inbox (`InstanceNotFound` if there is none)."""

    async def rewind(self, instance_id: str, event: pb.HistoryEvent) -> None:
        """Mark a failed instance running again and queue its ExecutionRewound `event`
        (`InstanceNotFound`, or `FailedPrecondition` if it has not failed)."""

    async def purge(self, instance_id: str, recursive: bool) -> int:
        """Delete a finished instance (and its finished sub-orchestrations when `recursive`) with
        everything it owns. Returns how many instances were deleted; running ones are kept."""

    async def query_instances(
        self, where: InstanceFilter, page_size: int, after: PageKey | None
    ) -> tuple[list[InstanceState], PageKey | None]:
        """A page of instances ordered by (created time, id), and the key of the next page."""

    async def list_finished_ids(
        self,
        statuses: frozenset[Status] | None,
        completed_from: datetime | None,
        completed_to: datetime | None,
        page_size: int,
        after: PageKey | None,
    ) -> tuple[list[str], PageKey | None]:
        """Ids of finished instances ordered by (completed time, id), and the next page's key."""

    async def purge_where(
        self, where: InstanceFilter, recursive: bool, batch: int, deadline: float | None
    ) -> tuple[int, bool]:
        """Purge finished instances matching `where` in transactions of at most `batch`
        instances. Stops after the batch that passes `deadline` (time.monotonic()); returns
        (deleted count, whether everything matching was purged)."""

    async def delete_everything(self) -> None:
        """Empty the task hub: every instance, history, message, activity and entity."""

    # -- orchestration work --------------------------------------------------------------

    async def lease_orchestrations(
        self, owner: str, now: datetime, limit: int
    ) -> Leased[OrchestrationWorkItem]:
        """Lease up to `limit` unleased instances that have visible inbox messages, earliest
        message first, in one transaction."""

    async def read_inbox(self, owner: str, instance_id: str, now: datetime) -> list[InboxMessage]:
        """The visible inbox of an instance `owner` holds (`LockLost` if it does not), in
        message order: what it leased, and what arrived since."""

    async def commit_step(
        self, owner: str, result: StepResult, lease_activities: int = 0
    ) -> Handed[ActivityWorkItem]:
        """Commit one orchestration step atomically and release the lease (`LockLost` if the
        lease is not `owner`'s). In the same transaction, lease up to `lease_activities` of the
        activities it scheduled to `owner` and return them (a hand-over: no lease of their
        own), in the order of `result.activities`."""

    async def commit_forced(self, result: StepResult, expected_update: datetime) -> bool:
        """Commit `result` over whatever the instance is doing, if the instance was not updated
        since `expected_update` and is not finished: its pending events and activities are
        dropped and a step in flight loses its lease. Returns whether it was committed."""

    async def postpone(
        self,
        owner: str,
        instance_id: str,
        message_ids: Sequence[int],
        until: datetime,
        failed: bool = False,
    ) -> None:
        """Make the messages invisible until `until` and release the lease. `failed` says the
        step did not complete (it counts towards the poison limit); otherwise waiting was the
        decision and the count starts again."""

    async def abandon_orchestration(
        self, owner: str, instance_id: str, failed: bool = False
    ) -> None:
        """Release the lease without consuming anything; `failed` counts the attempt towards
        the poison limit (a lease by itself does not: a sidecar killed while holding work,
        before any worker saw it, has not tried it)."""

    # -- activity work -------------------------------------------------------------------

    async def lease_activities(
        self, owner: str, now: datetime, limit: int
    ) -> Leased[ActivityWorkItem]:
        """Lease up to `limit` visible activities, oldest first, in one transaction."""

    async def complete_activity(
        self,
        owner: str,
        item: ActivityWorkItem,
        result: pb.HistoryEvent,
        lease_orchestration: bool = False,
        ahead: StepAhead | None = None,
    ) -> OrchestrationWorkItem | Handed[ActivityWorkItem] | None:
        """Delete the activity and deliver `result` to its orchestration in one transaction.

        The result is dropped when the orchestration no longer runs that execution. With
        `lease_orchestration`, the orchestration, if nobody leases it, is leased to `owner` in
        the same transaction and returned as a work item. With `ahead`, the orchestration's
        step on `result` alone: if the instance is as that step found it (nobody leases it,
        it was last updated at `ahead.found_update`, its inbox is empty), the step is
        committed with the result in its history (no inbox message, no lease) and the
        activities it leased are returned; otherwise the step is dropped."""

    async def abandon_activity(
        self, owner: str, item: ActivityWorkItem, delay: float, failed: bool = False
    ) -> None:
        """Release the activity; it becomes visible again after `delay` seconds. `failed`
        counts the attempt towards the poison limit."""

    # -- entities ------------------------------------------------------------------------

    async def signal_entity(
        self, entity_id: str, event: pb.HistoryEvent, visible_at: datetime
    ) -> None:
        """Queue an operation for an entity, creating the entity if needed."""

    async def get_entity(self, entity_id: str) -> EntityState | None:
        """The entity's row with its backlog, or None if it has none."""

    async def query_entities(
        self, where: EntityFilter, page_size: int, after: str | None
    ) -> tuple[list[EntityState], str | None]:
        """A page of entities ordered by id, and the id to continue after."""

    async def clean_entity_storage(
        self, remove_empty: bool, release_orphaned_locks: bool
    ) -> tuple[int, int]:
        """Delete entities with no state, lock or queue; release locks whose orchestration is
        gone or finished. Returns (entities removed, locks released)."""

    async def lease_entities(self, owner: str, now: datetime, limit: int) -> Leased[EntityWorkItem]:
        """Lease up to `limit` unleased entities with visible messages that are not deferred."""

    async def commit_entity(self, owner: str, result: EntityStepResult) -> None:
        """Commit one entity step atomically and release the lease (`LockLost` if the lease is
        not `owner`'s)."""

    async def postpone_entity(
        self,
        owner: str,
        entity_id: str,
        message_ids: Sequence[int],
        until: datetime,
        failed: bool = False,
    ) -> None:
        """Make the messages invisible until `until` and release the lease; `failed` counts
        towards the poison limit."""
