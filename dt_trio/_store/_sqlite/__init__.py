"""The sqlite store: WAL on a file, or a private in-memory database.

__init__.py    SqliteBackend: the Backend protocol over the modules below
_writer.py     connections: one writer with group commit, a pool of readers
_cache.py      the writer's cache of instance rows and histories
_schema.py     schema.sql, created or migrated at open
_apply.py      a Commit applied: guards, writes, leases taken
_instances.py  SQL of instances, histories and inboxes
_work.py       SQL of activities
_entities.py   SQL of entities
_rows.py       values as stored; bulk statements
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
import time
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

import trio

from dt_trio._core import EntityState, InboxMessage, InstanceState, Status
from dt_trio._core._commit import (
    ActivityWorkItem,
    Applied,
    Commit,
    EntityWorkItem,
    Lease,
    OrchestrationWorkItem,
    wakeups,
)
from dt_trio._errors import LockLost
from dt_trio._proto import orchestrator_service_pb2 as pb
from dt_trio._store._backend import (
    EntityFilter,
    FinishedFilter,
    InstanceFilter,
    Leased,
    NullListener,
    PageKey,
    StoreListener,
    notify,
)
from dt_trio._store._durability import Durability
from dt_trio._store._rows import us
from dt_trio._store._sqlite import _apply, _entities, _instances, _schema, _work
from dt_trio._store._sqlite._cache import cache_of
from dt_trio._store._sqlite._writer import Connections

W = TypeVar("W")


class SqliteBackend:
    """The sqlite implementation of `dt_trio._store.Backend`.

    `path` is a file name, or "" for an in-memory database private to this object (which
    survives nothing: `durability` FULL asks for a file).

    One process owns a store (it holds the file's lock): a lease never expires, and opening
    the store voids the leases of the process before. Epochs come from a counter of this
    object: after the opening's voiding, no lease of an earlier one is left to compare with.
    """

    def __init__(
        self,
        path: str,
        listener: StoreListener | None = None,
        durability: Durability = Durability.NORMAL,
    ) -> None:
        if durability is Durability.FULL and not path:
            raise ValueError("durability full needs a store file: a memory store keeps nothing")
        self.path = path
        self.durability = durability
        self.description = f"sqlite::{path}" if path else "sqlite::memory"
        self.listener: StoreListener = listener or NullListener()
        self._db = Connections(
            path,
            self.description,
            durability.name,
            lambda reason: self.listener.store_fault(reason),
        )
        self._next_epoch = functools.partial(next, itertools.count(1))
        self.commit_stats = self._db.stats

    async def open(self) -> None:
        """Open the store: create the file (owner-only) if it does not exist, take it for
        this process, check that it is a dt-trio store, and create or migrate the schema. On
        failure nothing is left behind: a file this call created is removed again.

        StoreUnavailable if the file is held by another store (in this process or another),
        is not a dt-trio store (or one of a newer version), or cannot be opened."""
        check = functools.partial(_schema.check_is_store, path=self.path)
        await self._db.open(check, _schema.prepare)

    async def close(self) -> None:
        await self._db.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._db.run(task_status=task_status)

    async def try_write(self) -> None:
        def rewrite(conn: sqlite3.Connection) -> None:
            # the schema version, rewritten as it is: a write that changes nothing
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            conn.execute(f"PRAGMA user_version = {int(version)}")

        await self._db.write(rewrite)

    # -- writes ----------------------------------------------------------------------------

    async def apply(self, commit: Commit) -> Applied:
        applied = await self._db.write(functools.partial(_apply.apply, commit, self._next_epoch))
        notify(self.listener, wakeups(commit, applied))
        self.listener.committed(commit, applied)
        return applied

    # -- leases ----------------------------------------------------------------------------

    async def lease_orchestrations(
        self, owner: str, now: datetime, limit: int
    ) -> Leased[OrchestrationWorkItem]:
        return await self._lease(_instances.lease, owner, now, limit)

    async def lease_activities(
        self, owner: str, now: datetime, limit: int
    ) -> Leased[ActivityWorkItem]:
        return await self._lease(_work.lease, owner, now, limit)

    async def lease_entities(self, owner: str, now: datetime, limit: int) -> Leased[EntityWorkItem]:
        return await self._lease(_entities.lease, owner, now, limit)

    async def _lease(
        self,
        lease: Callable[[sqlite3.Connection, str, int, int, int], Leased[W]],
        owner: str,
        now: datetime,
        limit: int,
    ) -> Leased[W]:
        now_us = us(now)

        def write(conn: sqlite3.Connection) -> Leased[W]:
            return lease(conn, owner, self._next_epoch(), now_us, limit)

        return await self._db.write(write)

    async def read_inbox(self, instance_id: str, lease: Lease, now: datetime) -> list[InboxMessage]:
        now_us = us(now)

        def read(conn: sqlite3.Connection) -> list[InboxMessage]:
            if _instances.holder(conn, instance_id) != lease:
                raise LockLost(f"instance '{instance_id}' is no longer leased by {lease.owner}")
            return _instances.read_inbox(conn, instance_id, now_us)

        return await self._db.read(read)

    # -- reads -----------------------------------------------------------------------------

    async def get_instance(self, instance_id: str) -> InstanceState | None:
        cache = self._db.cache
        kept = cache.row(instance_id) if cache is not None else None
        if kept is not None:
            return kept
        return await self._db.read(functools.partial(_instances.get, instance_id=instance_id))

    async def get_history(self, instance_id: str) -> list[pb.HistoryEvent]:
        return await self._db.read(functools.partial(_instances.history, instance_id=instance_id))

    async def query_instances(
        self,
        where: InstanceFilter,
        page_size: int,
        after: PageKey | None,
        newest_first: bool = False,
    ) -> tuple[list[InstanceState], PageKey | None]:
        return await self._db.read(
            functools.partial(
                _instances.query,
                where=where,
                page_size=page_size,
                after=after,
                newest_first=newest_first,
            )
        )

    async def count_instances(self, where: InstanceFilter) -> dict[Status, int]:
        return await self._db.read(functools.partial(_instances.count, where=where))

    async def list_finished_ids(
        self, where: FinishedFilter, page_size: int, after: PageKey | None
    ) -> tuple[list[str], PageKey | None]:
        return await self._db.read(
            functools.partial(
                _instances.list_finished, where=where, page_size=page_size, after=after
            )
        )

    async def get_entity(self, entity_id: str) -> EntityState | None:
        return await self._db.read(functools.partial(_entities.get, entity_id=entity_id))

    async def query_entities(
        self, where: EntityFilter, page_size: int, after: str | None
    ) -> tuple[list[EntityState], str | None]:
        return await self._db.read(
            functools.partial(_entities.query, where=where, page_size=page_size, after=after)
        )

    # -- administration --------------------------------------------------------------------

    async def purge(self, instance_id: str, recursive: bool) -> int:
        count = await self._db.write(
            functools.partial(_instances.purge, instance_id=instance_id, recursive=recursive)
        )
        self.listener.instance_changed(instance_id)
        return count

    async def purge_where(
        self, where: InstanceFilter, recursive: bool, batch: int, deadline: float | None
    ) -> tuple[int, bool]:
        purge = functools.partial(
            _instances.purge_some, where=where, recursive=recursive, batch=batch
        )
        total = 0
        while True:
            count = await self._db.write(purge)
            total += count
            if count == 0:
                return total, True
            if deadline is not None and time.monotonic() > deadline:
                return total, False

    async def delete_everything(self) -> None:
        await self._db.write(_instances.delete_everything)

    async def clean_entity_storage(
        self, remove_empty: bool, release_orphaned_locks: bool
    ) -> tuple[int, int]:
        removed, released = await self._db.write(
            functools.partial(
                _entities.clean,
                remove_empty=remove_empty,
                release_orphaned_locks=release_orphaned_locks,
            )
        )
        if released:
            self.listener.entity_work_added()
        return removed, released

    # -- diagnosis -------------------------------------------------------------------------

    async def verify_cache(self) -> list[str]:
        """Compare every cached instance with the store, in the writer's turn; returns the
        differences (empty when the cache is coherent). For tests and diagnosis."""

        def check(conn: sqlite3.Connection) -> list[str]:
            cache = cache_of(conn)
            assert cache is not None
            problems = []
            for instance_id in cache.known():
                entry = cache.get(instance_id)
                kept = entry[0] if entry is not None else cache.row(instance_id)
                if kept is None:
                    continue
                stored = _instances.get(conn, instance_id)
                if stored is None:
                    problems.append(f"{instance_id}: cached, but not in the store")
                elif stored != kept:
                    problems.append(f"{instance_id}: cached row {kept} != {stored}")
                elif entry is not None and _instances.history(conn, instance_id) != list(entry[1]):
                    problems.append(f"{instance_id}: cached history differs from the store's")
            return problems

        return await self._db.write(check)
