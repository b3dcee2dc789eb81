"""The store interface: what the engine and the gRPC service need from persistence.

Processors and rpc handlers only ever see this protocol and its value types; SQL lives in the
implementations. Every change is a `Commit` (dt_trio._core._commit), applied whole; besides,
a store leases work, and reads. All methods are async and safe to call concurrently. See
docs/store.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

import trio

from dt_trio._core import EntityState, InboxMessage, InstanceState, Status
from dt_trio._core._commit import (
    ActivityWorkItem,
    Applied,
    Commit,
    EntityWorkItem,
    Lease,
    OrchestrationWorkItem,
    Wakeups,
)
from dt_trio._metrics._tally import CommitStats
from dt_trio._proto import orchestrator_service_pb2 as pb

W = TypeVar("W")


class Leased(list[W]):
    """What a lease took, and, when it took fewer than it was allowed, `next_at`: the earliest
    time a message that is not visible yet becomes visible (None: no such message). Found in
    the lease's own transaction, so a processor with nothing to do knows how long to sleep
    without asking the store again."""

    next_at: datetime | None = None


@dataclass(frozen=True)
class EntityFilter:
    """Which entities QueryEntities returns; None means "any"."""

    id_prefix: str | None = None
    modified_from: datetime | None = None
    modified_to: datetime | None = None  # exclusive
    include_transient: bool = False  # entities without state (locked or with queued messages)


@dataclass(frozen=True)
class FinishedFilter:
    """Which finished instances ListInstanceIds returns; None means "any"."""

    statuses: frozenset[Status] | None = None
    completed_from: datetime | None = None
    completed_to: datetime | None = None  # exclusive

    @property
    def terminal_statuses(self) -> list[Status]:
        """The statuses asked for that an instance can finish in (every one, if none)."""
        return [s for s in (self.statuses or Status) if s.is_terminal]


@dataclass(frozen=True)
class InstanceFilter:
    """Which instances a query or a purge is about; None means "any"."""

    statuses: frozenset[Status] | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None  # exclusive
    id_prefix: str | None = None
    name: str | None = None  # the orchestrator's name, exactly


# A keyset page position: (time in microseconds, instance id) of the last row already returned.
PageKey = tuple[int, str]


class StoreListener(Protocol):
    """Told about every commit that changes what the processors or waiters should look at."""

    def orchestration_work_added(self) -> None: ...
    def activity_work_added(self) -> None: ...
    def entity_work_added(self) -> None: ...
    def instance_changed(self, instance_id: str, state: InstanceState | None = None) -> None:
        """`state`: the instance's new state, when the commit knows it."""

    def store_fault(self, reason: str | None) -> None:
        """Writes began failing for want of a usable store (`reason`), or work again (None).
        Called in the event loop's thread, once per change."""

    def any_instance_changed(self) -> None:
        """Any instance may have changed (news from another sidecar was lost, or named too
        many instances): whoever waits for one reads it again."""

    def committed(self, commit: Commit, applied: Applied) -> None:
        """`commit` was applied by this store, as `applied` says (what the hub counts)."""


def notify(listener: StoreListener, wakeups: Wakeups) -> None:
    """Tell `listener` what a commit woke (see `dt_trio._core._commit.wakeups`)."""
    if wakeups.orchestrations:
        listener.orchestration_work_added()
    if wakeups.activities:
        listener.activity_work_added()
    if wakeups.entities:
        listener.entity_work_added()
    for instance_id, state in wakeups.instances:
        listener.instance_changed(instance_id, state)


class NullListener:
    """A listener for a store nobody waits on."""

    def orchestration_work_added(self) -> None:
        pass

    def activity_work_added(self) -> None:
        pass

    def entity_work_added(self) -> None:
        pass

    def instance_changed(self, instance_id: str, state: InstanceState | None = None) -> None:
        pass

    def store_fault(self, reason: str | None) -> None:
        pass

    def any_instance_changed(self) -> None:
        pass

    def committed(self, commit: Commit, applied: Applied) -> None:
        pass


class Backend(Protocol):
    """A durable task hub store (see docs/store.md)."""

    description: str
    # Its write transactions (see `CommitStats`), for /metrics.
    commit_stats: CommitStats

    async def open(self) -> None:
        """Create or migrate the schema; refuse a store this version cannot use."""

    async def close(self) -> None: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The store's own duties until cancelled (sqlite: the group-commit writer, which
        commits what is still queued when cancelled). A hub runs it beside everything that
        writes, and stops it last. Without it, commits still work: their callers drive them."""

    async def try_write(self) -> None:
        """Commit a write that changes nothing anyone reads, so that a store fault shows or
        clears (StoreUnavailable while it lasts): the hub's health watch calls it while the
        listener has been told of a fault (`StoreListener.store_fault`)."""

    # -- writes --------------------------------------------------------------------------

    async def apply(self, commit: Commit) -> Applied:
        """Apply `commit` in one transaction, all of it or nothing (see `Commit`): the error
        of its first failing guard is raised, unless it has an `otherwise`. Tells the
        listener what it woke."""

    # -- leases --------------------------------------------------------------------------

    async def lease_orchestrations(
        self, owner: str, now: datetime, limit: int
    ) -> Leased[OrchestrationWorkItem]:
        """Lease up to `limit` unleased instances that have messages visible at `now`,
        earliest message first, in one transaction."""

    async def lease_activities(
        self, owner: str, now: datetime, limit: int
    ) -> Leased[ActivityWorkItem]:
        """Lease up to `limit` activities visible at `now`, oldest first."""

    async def lease_entities(self, owner: str, now: datetime, limit: int) -> Leased[EntityWorkItem]:
        """Lease up to `limit` unleased entities with messages visible at `now` that are not
        deferred."""

    async def read_inbox(self, instance_id: str, lease: Lease, now: datetime) -> list[InboxMessage]:
        """The messages visible at `now` of an instance leased with `lease` (`LockLost` if it
        is not), in order: what it leased, and what arrived since."""

    # -- reads ---------------------------------------------------------------------------

    async def get_instance(self, instance_id: str) -> InstanceState | None: ...

    async def get_history(self, instance_id: str) -> list[pb.HistoryEvent]: ...

    async def query_instances(
        self,
        where: InstanceFilter,
        page_size: int,
        after: PageKey | None,
        newest_first: bool = False,
    ) -> tuple[list[InstanceState], PageKey | None]:
        """A page of instances ordered by (created time, id), or the reverse when
        `newest_first`, and the key of the next page."""

    async def count_instances(self, where: InstanceFilter) -> dict[Status, int]:
        """How many instances match `where`, per status (statuses with none left out)."""

    async def list_finished_ids(
        self, where: FinishedFilter, page_size: int, after: PageKey | None
    ) -> tuple[list[str], PageKey | None]:
        """Ids of finished instances ordered by (completed time, id), and the next page's key."""

    async def get_entity(self, entity_id: str) -> EntityState | None:
        """The entity's row with its backlog, or None if it has none."""

    async def query_entities(
        self, where: EntityFilter, page_size: int, after: str | None
    ) -> tuple[list[EntityState], str | None]:
        """A page of entities ordered by id, and the id to continue after."""

    # -- administration ------------------------------------------------------------------

    async def purge(self, instance_id: str, recursive: bool) -> int:
        """Delete a finished instance (and its finished sub-orchestrations when `recursive`) with
        everything it owns. Returns how many instances were deleted; running ones are kept."""

    async def purge_where(
        self, where: InstanceFilter, recursive: bool, batch: int, deadline: float | None
    ) -> tuple[int, bool]:
        """Purge finished instances matching `where` in transactions of at most `batch`
        instances. Stops after the batch that passes `deadline` (time.monotonic()); returns
        (deleted count, whether everything matching was purged)."""

    async def delete_everything(self) -> None:
        """Empty the task hub: every instance, history, message, activity and entity."""

    async def clean_entity_storage(
        self, remove_empty: bool, release_orphaned_locks: bool
    ) -> tuple[int, int]:
        """Delete entities with no state, lock or queue; release locks whose orchestration is
        gone or finished. Returns (entities removed, locks released)."""
