"""The sqlite store: WAL on a file, or a private in-memory database.

Every call runs in a worker thread through `trio.to_thread.run_sync`. Writes go through one
writer connection, serialised by a CapacityLimiter of one; on a file, reads use a small pool of
reader connections so that they never wait behind a write transaction.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import pathlib
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import IO, Any, TypeVar

import outcome
import trio

from dt_trio._core import (
    EntityState,
    EntityStepResult,
    InboxMessage,
    InstanceState,
    NewInstance,
    OutboundMessage,
    Status,
    StepResult,
    held_locks,
    is_entity_id,
)
from dt_trio._errors import (
    FailedPrecondition,
    InstanceExists,
    InstanceNotFound,
    LockLost,
    StoreUnavailable,
)
from dt_trio._proto import orchestrator_service_pb2 as pb
from dt_trio._store._backend import (
    ActivityWorkItem,
    EntityFilter,
    EntityWorkItem,
    Handed,
    InstanceFilter,
    Leased,
    OrchestrationWorkItem,
    PageKey,
    StepAhead,
    StoreListener,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
SCHEMA = (pathlib.Path(__file__).parent / "schema.sql").read_text()
READERS = 4
# Running instances whose row and history the writer keeps in memory (see _InstanceCache),
# and as many rows of finished instances.
CACHED_INSTANCES = 4096
CACHED_BYTES = 64 * 1024 * 1024  # ... and at most this much serialized history, and payload
_TERMINAL = tuple(int(s) for s in Status if s.is_terminal)

_INSTANCE_FIELDS = 16
_INSTANCE_COLUMNS = (
    "instance_id, name, version, execution_id, status, input, output, custom_status, failure, "
    "created_at, last_updated_at, completed_at, scheduled_start_at, parent_instance_id, tags, "
    "trace_context"
)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ENTITY_COLUMNS = (
    "instance_id, state, last_modified_at, locked_by, lock_owner, "
    "(SELECT COUNT(*) FROM entity_inbox m WHERE m.instance_id = e.instance_id) AS backlog"
)
_MICROSECOND = timedelta(microseconds=1)


def _us(dt: datetime) -> int:
    # Exact integer arithmetic: a time read back compares equal to the one written.
    return ((dt if dt.tzinfo else dt.replace(tzinfo=UTC)) - _EPOCH) // _MICROSECOND


def _dt(us: int | None) -> datetime | None:
    if us is None:
        return None
    return _EPOCH + timedelta(microseconds=us)


def _event(blob: bytes) -> pb.HistoryEvent:
    return pb.HistoryEvent.FromString(blob)


def _row_to_state(row: sqlite3.Row) -> InstanceState:
    failure = pb.TaskFailureDetails.FromString(row["failure"]) if row["failure"] else None
    return InstanceState(
        instance_id=row["instance_id"],
        name=row["name"],
        version=row["version"],
        execution_id=row["execution_id"],
        status=Status(row["status"]),
        input=row["input"],
        output=row["output"],
        custom_status=row["custom_status"],
        failure=failure,
        created_at=_dt(row["created_at"]),  # type: ignore[arg-type]
        last_updated_at=_dt(row["last_updated_at"]),  # type: ignore[arg-type]
        completed_at=_dt(row["completed_at"]),
        scheduled_start_at=_dt(row["scheduled_start_at"]),
        parent_instance_id=row["parent_instance_id"],
        tags=json.loads(row["tags"]) if row["tags"] else {},
        trace_context=pb.OrchestrationTraceContext.FromString(row["trace_context"])
        if row["trace_context"]
        else None,
    )


def _row_to_entity(row: sqlite3.Row) -> EntityState:
    modified = _dt(row["last_modified_at"])
    assert modified is not None
    return EntityState(
        instance_id=row["instance_id"],
        last_modified_at=modified,
        state=row["state"],
        locked_by=row["locked_by"],
        lock_owner=row["lock_owner"],
        backlog=row["backlog"],
    )


def _state_values(state: InstanceState) -> tuple[object, ...]:
    return (
        state.instance_id,
        state.name,
        state.version,
        state.execution_id,
        int(state.status),
        state.input,
        state.output,
        state.custom_status,
        state.failure.SerializeToString() if state.failure is not None else None,
        _us(state.created_at),
        _us(state.last_updated_at),
        _us(state.completed_at) if state.completed_at else None,
        _us(state.scheduled_start_at) if state.scheduled_start_at else None,
        state.parent_instance_id,
        json.dumps(dict(state.tags)) if state.tags else None,
        state.trace_context.SerializeToString() if state.trace_context is not None else None,
    )


class _Failed(Exception):
    """Rolls back the transaction of a lone write that failed."""


@dataclasses.dataclass(eq=False)
class _WriteSlot:
    """One write waiting for its turn in a group commit."""

    fn: Callable[[sqlite3.Connection], Any]
    outcome: outcome.Outcome[Any] | None = None
    done: trio.Event = dataclasses.field(default_factory=trio.Event)


# (row, history, the history's serialized size)
_Cached = tuple[InstanceState, tuple[pb.HistoryEvent, ...], int]
# What a write leaves for an instance: a running one's row and history, a finished one's row,
# or nothing (forget it).
_Entry = _Cached | InstanceState | None


def _payload_size(state: InstanceState) -> int:
    failure = state.failure.ByteSize() if state.failure is not None else 0
    return sum(len(v) for v in (state.input, state.output, state.custom_status) if v) + failure


class _InstanceCache:
    """The rows and histories of running instances, and the rows of finished ones, as last
    committed.

    Without it every step's lease (and every hand-over) reads the instance row and parses its
    whole history again, and every client that asks for an instance as it finishes
    (GetInstance, the waits) reads its row again. Only write transactions change it, in the
    writer's turn: what a write puts or drops is pending until its transaction commits
    (`commit`), undone with its savepoint (`undo_to`) or its transaction (`rollback`); reads
    within the transaction see the pending state. One process owns the store, so nothing
    changes a cached instance behind its back. Bounded in entries and in bytes, running and
    finished instances each.
    """

    def __init__(self, capacity: int, max_bytes: int = CACHED_BYTES) -> None:
        self._entries: collections.OrderedDict[str, _Cached] = collections.OrderedDict()
        self._bytes = 0  # the histories' total serialized size
        self._finished: collections.OrderedDict[str, InstanceState] = collections.OrderedDict()
        self._finished_bytes = 0  # their inputs, outputs, custom statuses and failures
        self._max_bytes = max_bytes
        self._pending: dict[str, _Entry] = {}
        # (instance, had a pending value, that value): how to undo a put
        self._journal: list[tuple[str, bool, _Entry]] = []
        self._capacity = capacity

    def get(self, instance_id: str) -> _Cached | None:
        """A running instance's row and history, for a step of it (None: read the store)."""
        if instance_id in self._pending:
            entry = self._pending[instance_id]
            return entry if isinstance(entry, tuple) else None
        return self._entries.get(instance_id)

    def row(self, instance_id: str) -> InstanceState | None:
        """The instance's row as committed (None: read the store). Safe from any thread: a
        reader beside a commit finds the row before or after it, or nothing."""
        entry = self._entries.get(instance_id)
        return entry[0] if entry is not None else self._finished.get(instance_id)

    def put(self, instance_id: str, entry: _Entry) -> None:
        """Cache `entry` for the instance once the transaction commits: its row and history
        while it runs, its row alone once finished, None to forget it."""
        had = instance_id in self._pending
        self._journal.append((instance_id, had, self._pending.get(instance_id)))
        self._pending[instance_id] = entry

    def mark(self) -> int:
        return len(self._journal)

    def undo_to(self, mark: int) -> None:
        while len(self._journal) > mark:
            instance_id, had, previous = self._journal.pop()
            if had:
                self._pending[instance_id] = previous
            else:
                del self._pending[instance_id]

    def commit(self) -> None:
        for instance_id, entry in self._pending.items():
            old = self._entries.pop(instance_id, None)
            if old is not None:
                self._bytes -= old[2]
            if isinstance(entry, InstanceState):
                # (replaced, not popped first: a reader meanwhile finds the old row or this)
                previous = self._finished.get(instance_id)
                if previous is not None:
                    self._finished_bytes -= _payload_size(previous)
                    self._finished.move_to_end(instance_id)
                self._finished[instance_id] = entry
                self._finished_bytes += _payload_size(entry)
                continue
            dropped = self._finished.pop(instance_id, None)
            if dropped is not None:
                self._finished_bytes -= _payload_size(dropped)
            if entry is not None:
                self._entries[instance_id] = entry
                self._bytes += entry[2]
        while len(self._entries) > self._capacity or self._bytes > self._max_bytes:
            self._bytes -= self._entries.popitem(last=False)[1][2]
        finished = self._finished
        while len(finished) > self._capacity or self._finished_bytes > self._max_bytes:
            self._finished_bytes -= _payload_size(finished.popitem(last=False)[1])
        self.rollback()

    def rollback(self) -> None:
        self._pending.clear()
        self._journal.clear()

    def forget_all(self) -> None:
        self._entries.clear()
        self._bytes = 0
        self._finished.clear()
        self._finished_bytes = 0
        self.rollback()


class _WriterConnection(sqlite3.Connection):
    """The writer's connection, carrying the cache its transactions keep (see `_cache`)."""

    cache: _InstanceCache


def _cache(conn: sqlite3.Connection) -> _InstanceCache | None:
    return conn.cache if isinstance(conn, _WriterConnection) else None


class _NullListener:
    def orchestration_work_added(self) -> None:
        pass

    def activity_work_added(self) -> None:
        pass

    def entity_work_added(self) -> None:
        pass

    def instance_changed(self, instance_id: str, state: InstanceState | None = None) -> None:
        pass

    def any_instance_changed(self) -> None:
        pass


class SqliteBackend:
    """The sqlite implementation of `dt_trio._store.Backend`.

    `path` is a file name, or "" for an in-memory database private to this object.
    """

    def __init__(self, path: str, listener: StoreListener | None = None) -> None:
        self.path = path
        self.description = f"sqlite::{path}" if path else "sqlite::memory"
        self.listener: StoreListener = listener or _NullListener()
        self._writer: sqlite3.Connection | None = None
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = []
        self._write_limiter = trio.CapacityLimiter(1)
        # The queue and the flag are shared with the writer thread (see `_write_loop`).
        self._queue_lock = threading.Lock()
        self._write_queue: list[_WriteSlot] = []
        self._writing = False
        self._writer_wakeup: trio.Event | None = None
        self._read_limiter = trio.CapacityLimiter(READERS)
        self._memory_uri = f"file:dt-trio-{uuid.uuid4().hex}?mode=memory&cache=shared"
        self._lock_file: IO[bytes] | None = None
        self._faulty = False  # the last write failed for want of a usable store

    # -- connections -----------------------------------------------------------------------

    def _connect(
        self, factory: type[sqlite3.Connection] = sqlite3.Connection
    ) -> sqlite3.Connection:
        if self.path:
            conn = sqlite3.connect(
                self.path,
                check_same_thread=False,
                isolation_level=None,
                timeout=5.0,
                factory=factory,
            )
        else:
            conn = sqlite3.connect(
                self._memory_uri,
                uri=True,
                check_same_thread=False,
                isolation_level=None,
                factory=factory,
            )
        conn.row_factory = sqlite3.Row
        self._all.append(conn)
        return conn

    def _open_sync(self) -> None:
        if self.path:
            self._lock_file = _exclusive_lock(self.path)
            file = pathlib.Path(self.path)
            if not file.exists():
                # Owner-only: the store holds every payload of every orchestration.
                file.touch(mode=0o600)
        writer = self._connect(_WriterConnection)
        assert isinstance(writer, _WriterConnection)
        writer.cache = _InstanceCache(CACHED_INSTANCES)
        if self.path:
            writer.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode loses nothing when the process dies; only an OS crash or power
            # loss can roll back the last commits.
            writer.execute("PRAGMA synchronous=NORMAL")
        writer.execute("PRAGMA foreign_keys=OFF")
        # Statement journals (each write of a group commit runs in a savepoint) in memory,
        # not in a temporary file created and unlinked per transaction.
        writer.execute("PRAGMA temp_store=MEMORY")
        writer.executescript(SCHEMA)
        # A single process owns the store: leases left by a previous process are void.
        writer.execute("UPDATE instances SET locked_by = NULL WHERE locked_by IS NOT NULL")
        writer.execute("UPDATE activities SET locked_by = NULL WHERE locked_by IS NOT NULL")
        writer.execute("UPDATE entities SET leased_by = NULL WHERE leased_by IS NOT NULL")
        self._writer = writer
        if self.path:
            for _ in range(READERS):
                self._readers.put(self._connect())

    async def open(self) -> None:
        try:
            await trio.to_thread.run_sync(self._open_sync, limiter=self._write_limiter)
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise StoreUnavailable(f"cannot open the store {self.description}: {exc}") from exc
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        def close_all() -> None:
            self._writer = None  # writes, and reads from its cache, now fail: not open
            for conn in self._all:
                conn.close()
            self._all.clear()
            if self._lock_file is not None:
                self._lock_file.close()  # releases the lock
                self._lock_file = None

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close_all, limiter=self._write_limiter)

    async def run_writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The store's writer: commits the queued writes (see `_run_write`) until cancelled,
        then what is still queued. The hub runs it beside everything that writes, and stops
        it last. Without it (a store used on its own) each write's caller drives the commits."""
        wakeup = self._writer_wakeup = trio.Event()
        task_status.started()
        try:
            while True:
                await wakeup.wait()
                wakeup = self._writer_wakeup = trio.Event()
                await self._drive()
        finally:
            self._writer_wakeup = None
            if self._writing:  # woken, but cancelled before it drove
                await self._drive()

    def writer_busy(self) -> bool:
        return self._writing

    async def _run_write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in a write transaction, grouped with the writes waiting beside it.

        Group commit: writes that arrive while a transaction is running wait, then all run in
        the next one, each in a savepoint of its own, so one failing write (a lost lease, say)
        rolls back alone. The writer task (`run_writer`) drives the batches, or, while it
        does not run, whoever finds no transaction running; either way that loop is shielded,
        so a cancelled caller cannot strand the others.
        """
        slot = _WriteSlot(fn)
        with self._queue_lock:
            self._write_queue.append(slot)
            idle, self._writing = not self._writing, True
        if idle:
            if self._writer_wakeup is not None:
                self._writer_wakeup.set()
            else:
                await self._drive()
        if not slot.done.is_set():
            await slot.done.wait()
        assert slot.outcome is not None
        return slot.outcome.unwrap()  # type: ignore[no-any-return]

    async def _drive(self) -> None:
        """Commit batches until the queue is empty (shielded: others' writes are queued)."""
        token = trio.lowlevel.current_trio_token()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._write_loop, token, limiter=self._write_limiter)

    def _write_loop(self, token: trio.lowlevel.TrioToken) -> None:
        """In the writer thread: commit batch after batch until the queue is empty.

        The next batch starts as soon as the last one is committed, with what queued up
        meanwhile: no round trip through the event loop between two transactions. Each
        batch's writers are woken as it commits (`run_sync_soon` keeps their order)."""
        while True:
            with self._queue_lock:
                batch, self._write_queue = self._write_queue, []
                if not batch:
                    self._writing = False
                    return
            try:
                self._write_batch(batch)
            except Exception as exc:  # a bug: fail this batch's writes, not the next ones
                log.exception("the store's writer failed")
                for slot in batch:
                    if slot.outcome is None:
                        slot.outcome = outcome.Error(exc)
            token.run_sync_soon(_settle, batch)

    def _write_batch(self, batch: list[_WriteSlot]) -> None:
        conn = self._writer
        if conn is None:
            for slot in batch:
                slot.outcome = outcome.Error(StoreUnavailable("the store is not open"))
            return
        assert isinstance(conn, _WriterConnection)
        if len(batch) > 1 and _commit_whole(conn, batch):
            self._note_health(None)
            return
        cache = conn.cache
        # A lone write needs no savepoint: its failure rolls back the whole transaction.
        alone = len(batch) == 1
        committed = False
        try:
            with _transaction(conn):
                for slot in batch:
                    if not alone:
                        conn.execute("SAVEPOINT one_write")
                    mark = cache.mark()
                    try:
                        slot.outcome = outcome.Value(slot.fn(conn))
                    except Exception as exc:
                        if isinstance(exc, sqlite3.OperationalError):
                            exc = StoreUnavailable(f"the store cannot write: {exc}")
                        slot.outcome = outcome.Error(exc)
                        if alone:
                            raise _Failed from exc
                        conn.execute("ROLLBACK TO one_write")
                        cache.undo_to(mark)
                    if not alone:
                        conn.execute("RELEASE one_write")
            committed = True
        except _Failed:
            pass  # the transaction was rolled back; the write's outcome says why
        except sqlite3.Error as exc:
            failed = StoreUnavailable(f"the store cannot write: {exc}")
            for slot in batch:
                slot.outcome = outcome.Error(failed)
        finally:
            if committed:
                cache.commit()
            else:
                cache.rollback()
        self._note_health(
            next(
                (
                    slot.outcome.error
                    for slot in batch
                    if isinstance(slot.outcome, outcome.Error)
                    and isinstance(slot.outcome.error, StoreUnavailable)
                ),
                None,
            )
        )

    def _note_health(self, fault: BaseException | None) -> None:
        """Log the start and the end of a store fault once each, not once per write."""
        if fault is not None and not self._faulty:
            self._faulty = True
            log.error("%s (%s); callers get UNAVAILABLE until it clears", fault, self.description)
        elif fault is None and self._faulty:
            self._faulty = False
            log.warning("the store %s is writable again", self.description)

    async def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise StoreUnavailable("the store is not open")
        if not self.path:
            # A private memory database has one connection: its reads queue with the writes
            # (the writer's thread runs batch after batch while writes keep coming).
            return await self._run_write(fn)

        def call() -> T:
            conn = self._readers.get()
            try:
                with _transaction(conn, mode="DEFERRED"):
                    return fn(conn)
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"the store cannot read: {exc}") from exc
            finally:
                self._readers.put(conn)

        return await trio.to_thread.run_sync(call, limiter=self._read_limiter)

    async def verify_cache(self) -> list[str]:
        """Compare every cached instance with the store, in the writer's turn; returns the
        differences (empty when the cache is coherent). For tests and diagnosis."""

        def check(conn: sqlite3.Connection) -> list[str]:
            cache = _cache(conn)
            assert cache is not None
            problems = []
            for instance_id in {*cache._entries, *cache._pending, *cache._finished}:
                entry = cache.get(instance_id)
                kept = entry[0] if entry is not None else cache.row(instance_id)
                if kept is None:
                    continue
                row = conn.execute(
                    f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE instance_id = ?",
                    (instance_id,),
                ).fetchone()
                if row is None:
                    problems.append(f"{instance_id}: cached, but not in the store")
                elif _row_to_state(row) != kept:
                    problems.append(f"{instance_id}: cached row {kept} != {_row_to_state(row)}")
                elif entry is not None and _history(conn, instance_id) != list(entry[1]):
                    problems.append(f"{instance_id}: cached history differs from the store's")
            return problems

        return await self._run_write(check)

    # -- instances -------------------------------------------------------------------------

    async def create_instance(
        self,
        state: InstanceState,
        started: pb.HistoryEvent,
        visible_at: datetime,
        replaceable: Collection[Status] | None = None,
        lease_to: str | None = None,
        ahead: StepAhead | None = None,
    ) -> OrchestrationWorkItem | Handed[ActivityWorkItem] | None:
        allowed = set(_TERMINAL) if replaceable is None else {int(s) for s in replaceable}
        visible_us = _us(visible_at)
        changed: list[str] = []

        def write(
            conn: sqlite3.Connection,
        ) -> OrchestrationWorkItem | Handed[ActivityWorkItem] | None:
            row = conn.execute(
                "SELECT status FROM instances WHERE instance_id = ?", (state.instance_id,)
            ).fetchone()
            if row is not None:
                if row["status"] not in allowed:
                    raise InstanceExists(state.instance_id, Status(row["status"]).label)
                _delete_instances(conn, [state.instance_id])
            now = visible_us <= _us(datetime.now(UTC))  # a scheduled start waits for its time
            if ahead is not None and now:
                _insert_instance(conn, state)
                return _commit_ahead(conn, ahead, changed)
            owner = lease_to if now else None
            message_id = _insert_instance(conn, state, started, visible_at, owner)
            if owner is None:
                return None
            # All of it is known: nothing to read back.
            return OrchestrationWorkItem(state, [], [InboxMessage(message_id, started)], 1)

        work = await self._run_write(write)
        if isinstance(work, Handed):
            assert ahead is not None
            self._after_step(ahead.result, changed, len(work), work.waiting)
            return work
        if work is None:
            self.listener.orchestration_work_added()
        self.listener.instance_changed(state.instance_id)
        return work

    async def get_instance(self, instance_id: str) -> InstanceState | None:
        writer = self._writer
        if isinstance(writer, _WriterConnection):
            kept = writer.cache.row(instance_id)
            if kept is not None:
                return kept

        def read(conn: sqlite3.Connection) -> InstanceState | None:
            row = conn.execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE instance_id = ?",
                (instance_id,),
            ).fetchone()
            return _row_to_state(row) if row is not None else None

        return await self._run_read(read)

    async def get_history(self, instance_id: str) -> list[pb.HistoryEvent]:
        def read(conn: sqlite3.Connection) -> list[pb.HistoryEvent]:
            return _history(conn, instance_id)

        return await self._run_read(read)

    async def enqueue(self, instance_id: str, event: pb.HistoryEvent, visible_at: datetime) -> None:
        blob = event.SerializeToString()

        def write(conn: sqlite3.Connection) -> None:
            exists = conn.execute(
                "SELECT 1 FROM instances WHERE instance_id = ?", (instance_id,)
            ).fetchone()
            if exists is None:
                raise InstanceNotFound(instance_id)
            conn.execute(
                "INSERT INTO inbox (instance_id, event, visible_at) VALUES (?, ?, ?)",
                (instance_id, blob, _us(visible_at)),
            )

        await self._run_write(write)
        self.listener.orchestration_work_added()

    async def rewind(self, instance_id: str, event: pb.HistoryEvent) -> None:
        blob = event.SerializeToString()
        failed = int(Status.FAILED)

        def write(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT status FROM instances WHERE instance_id = ?", (instance_id,)
            ).fetchone()
            if row is None:
                raise InstanceNotFound(instance_id)
            if row["status"] != failed:
                raise FailedPrecondition(
                    f"instance '{instance_id}' is {Status(row['status']).label}; only a failed "
                    "instance can be rewound"
                )
            now_us = _us(datetime.now(UTC))
            conn.execute(
                "UPDATE instances SET status = ?, output = NULL, failure = NULL, "
                "completed_at = NULL, last_updated_at = ? WHERE instance_id = ?",
                (int(Status.RUNNING), now_us, instance_id),
            )
            cache = _cache(conn)
            if cache is not None:
                cache.put(instance_id, None)  # read again at the next lease
            conn.execute(
                "INSERT INTO inbox (instance_id, event, visible_at) VALUES (?, ?, ?)",
                (instance_id, blob, now_us),
            )

        await self._run_write(write)
        self.listener.orchestration_work_added()
        self.listener.instance_changed(instance_id)

    async def purge(self, instance_id: str, recursive: bool) -> int:
        def write(conn: sqlite3.Connection) -> int:
            ids = [instance_id]
            if recursive:
                ids = [
                    r[0]
                    for r in conn.execute(
                        """
                        WITH RECURSIVE tree(id) AS (
                            SELECT ?
                            UNION SELECT i.instance_id FROM instances i
                                  JOIN tree ON i.parent_instance_id = tree.id
                        )
                        SELECT id FROM tree
                        """,
                        (instance_id,),
                    )
                ]
            marks = ",".join("?" * len(ids))
            finished = [
                r[0]
                for r in conn.execute(
                    f"SELECT instance_id FROM instances WHERE instance_id IN ({marks}) "
                    f"AND status IN ({','.join('?' * len(_TERMINAL))})",
                    (*ids, *_TERMINAL),
                )
            ]
            _delete_instances(conn, finished)
            return len(finished)

        count = await self._run_write(write)
        self.listener.instance_changed(instance_id)
        return count

    async def query_instances(
        self, where: InstanceFilter, page_size: int, after: PageKey | None
    ) -> tuple[list[InstanceState], PageKey | None]:
        clauses, params = _filter_sql(where)
        if after is not None:
            clauses.append("(created_at, instance_id) > (?, ?)")
            params += [after[0], after[1]]
        sql = (
            f"SELECT {_INSTANCE_COLUMNS} FROM instances"
            f"{' WHERE ' + ' AND '.join(clauses) if clauses else ''}"
            " ORDER BY created_at, instance_id LIMIT ?"
        )

        def read(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            return conn.execute(sql, (*params, page_size + 1)).fetchall()

        rows = await self._run_read(read)
        more = len(rows) > page_size
        rows = rows[:page_size]
        next_key = (rows[-1]["created_at"], rows[-1]["instance_id"]) if more and rows else None
        return [_row_to_state(r) for r in rows], next_key

    async def list_finished_ids(
        self,
        statuses: frozenset[Status] | None,
        completed_from: datetime | None,
        completed_to: datetime | None,
        page_size: int,
        after: PageKey | None,
    ) -> tuple[list[str], PageKey | None]:
        allowed = [int(s) for s in (statuses or Status) if s.is_terminal]
        clauses = [
            "completed_at IS NOT NULL",
            f"status IN ({','.join('?' * len(allowed))})",
        ]
        params: list[object] = list(allowed)
        if completed_from is not None:
            clauses.append("completed_at >= ?")
            params.append(_us(completed_from))
        if completed_to is not None:
            clauses.append("completed_at < ?")
            params.append(_us(completed_to))
        if after is not None:
            clauses.append("(completed_at, instance_id) > (?, ?)")
            params += [after[0], after[1]]
        # Walk the completion index in order and filter statuses on the way: a page of ids
        # costs the page, not a sort of every finished instance.
        sql = (
            "SELECT completed_at, instance_id FROM instances INDEXED BY instances_completed WHERE "
            + " AND ".join(clauses)
            + " ORDER BY completed_at, instance_id LIMIT ?"
        )

        def read(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            return conn.execute(sql, (*params, page_size + 1)).fetchall()

        rows = await self._run_read(read) if allowed else []
        more = len(rows) > page_size
        rows = rows[:page_size]
        next_key = (rows[-1][0], rows[-1][1]) if more and rows else None
        return [r[1] for r in rows], next_key

    async def purge_where(
        self, where: InstanceFilter, recursive: bool, batch: int, deadline: float | None
    ) -> tuple[int, bool]:
        finished = frozenset(s for s in (where.statuses or Status) if s.is_terminal)
        clauses, params = _filter_sql(dataclasses.replace(where, statuses=finished))
        select = "SELECT instance_id FROM instances WHERE " + " AND ".join(clauses) + " LIMIT ?"
        total = 0
        while True:

            def write(conn: sqlite3.Connection) -> int:
                ids = [r[0] for r in conn.execute(select, (*params, batch))]
                if recursive:
                    ids = _with_finished_descendants(conn, ids)
                _delete_instances(conn, ids)
                return len(ids)

            count = await self._run_write(write) if finished else 0
            total += count
            if count == 0:
                return total, True
            if deadline is not None and time.monotonic() > deadline:
                return total, False

    async def delete_everything(self) -> None:
        def write(conn: sqlite3.Connection) -> None:
            for table in (
                "history",
                "inbox",
                "activities",
                "instances",
                "entity_inbox",
                "entities",
            ):
                conn.execute(f"DELETE FROM {table}")
            cache = _cache(conn)
            if cache is not None:
                cache.forget_all()

        await self._run_write(write)

    # -- entities --------------------------------------------------------------------------

    async def signal_entity(
        self, entity_id: str, event: pb.HistoryEvent, visible_at: datetime
    ) -> None:
        def write(conn: sqlite3.Connection) -> None:
            _insert_message(conn, entity_id, event, _us(visible_at))

        await self._run_write(write)
        self.listener.entity_work_added()

    async def get_entity(self, entity_id: str) -> EntityState | None:
        def read(conn: sqlite3.Connection) -> EntityState | None:
            row = conn.execute(
                f"SELECT {_ENTITY_COLUMNS} FROM entities e WHERE instance_id = ?", (entity_id,)
            ).fetchone()
            return None if row is None else _row_to_entity(row)

        return await self._run_read(read)

    async def query_entities(
        self, where: EntityFilter, page_size: int, after: str | None
    ) -> tuple[list[EntityState], str | None]:
        clauses = ["instance_id > ?"]
        params: list[object] = [after or ""]
        if where.id_prefix:
            clauses.append("instance_id >= ? AND instance_id < ?")
            params += [where.id_prefix, where.id_prefix + "\U0010ffff"]
        if where.modified_from is not None:
            clauses.append("last_modified_at >= ?")
            params.append(_us(where.modified_from))
        if where.modified_to is not None:
            clauses.append("last_modified_at < ?")
            params.append(_us(where.modified_to))
        if not where.include_transient:
            clauses.append("state IS NOT NULL")

        def read(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            return conn.execute(
                f"SELECT {_ENTITY_COLUMNS} FROM entities e WHERE {' AND '.join(clauses)} "
                "ORDER BY instance_id LIMIT ?",
                (*params, page_size + 1),
            ).fetchall()

        rows = await self._run_read(read)
        entities = [_row_to_entity(r) for r in rows[:page_size]]
        more = len(rows) > page_size
        return entities, entities[-1].instance_id if more else None

    async def clean_entity_storage(
        self, remove_empty: bool, release_orphaned_locks: bool
    ) -> tuple[int, int]:
        def write(conn: sqlite3.Connection) -> tuple[int, int]:
            released = 0
            if release_orphaned_locks:
                # A lock is orphaned when its orchestration is gone or finished, or when the
                # orchestration's current execution does not hold it (it continued as new
                # while the lock request was still on its way, say).
                orphans = []
                for entity_id, section, owner, status in conn.execute(
                    "SELECT e.instance_id, e.locked_by, e.lock_owner, i.status FROM entities e "
                    "LEFT JOIN instances i ON i.instance_id = e.lock_owner "
                    "WHERE e.locked_by IS NOT NULL AND e.leased_by IS NULL"
                ).fetchall():
                    if status is None or status in _TERMINAL:
                        orphans.append(entity_id)
                    elif (section, entity_id) not in held_locks(_history(conn, owner)):
                        orphans.append(entity_id)
                for entity_id in orphans:
                    conn.execute(
                        "UPDATE entities SET locked_by = NULL, lock_owner = NULL "
                        "WHERE instance_id = ?",
                        (entity_id,),
                    )
                    # What waited for the lock may run now.
                    conn.execute(
                        "UPDATE entity_inbox SET deferred = 0 WHERE instance_id = ?", (entity_id,)
                    )
                released = len(orphans)
            removed = 0
            if remove_empty:
                removed = conn.execute(
                    "DELETE FROM entities WHERE state IS NULL AND locked_by IS NULL "
                    "AND leased_by IS NULL AND NOT EXISTS "
                    "(SELECT 1 FROM entity_inbox m WHERE m.instance_id = entities.instance_id)"
                ).rowcount
            return removed, released

        removed, released = await self._run_write(write)
        if released:
            self.listener.entity_work_added()
        return removed, released

    async def lease_entities(self, owner: str, now: datetime, limit: int) -> Leased[EntityWorkItem]:
        now_us = _us(now)

        def write(conn: sqlite3.Connection) -> Leased[EntityWorkItem]:
            ids = _lease_next(
                conn,
                "SELECT m.instance_id FROM entity_inbox m JOIN entities e "
                "USING (instance_id) WHERE m.deferred = 0 AND m.visible_at <= ? "
                "AND e.leased_by IS NULL ORDER BY m.visible_at LIMIT ?",
                "UPDATE entities SET leased_by = ? WHERE instance_id IN ({marks})",
                owner,
                now_us,
                limit,
            )
            leased: Leased[EntityWorkItem] = Leased()
            if len(ids) < limit:
                leased.next_at = _next_at(conn, _NEXT_ENTITY)
            if not ids:
                return leased
            marks = ",".join("?" * len(ids))
            rows = conn.execute(
                f"SELECT {_ENTITY_COLUMNS}, dequeue_count FROM entities e "
                f"WHERE instance_id IN ({marks})",
                ids,
            ).fetchall()
            inboxes: dict[str, list[InboxMessage]] = {i: [] for i in ids}
            for r in conn.execute(
                f"SELECT id, instance_id, event FROM entity_inbox WHERE instance_id IN ({marks}) "
                "AND visible_at <= ? ORDER BY id",
                (*ids, now_us),
            ):
                inboxes[r[1]].append(InboxMessage(r[0], _event(r[2])))
            leased.extend(
                EntityWorkItem(_row_to_entity(r), inboxes[r["instance_id"]], r["dequeue_count"] + 1)
                for r in rows
            )
            return leased

        return await self._run_write(write)

    async def commit_entity(self, owner: str, result: EntityStepResult) -> None:
        entity = result.entity
        now_us = _us(datetime.now(UTC))

        def write(conn: sqlite3.Connection) -> list[str]:
            _check_entity_lease(conn, owner, entity.instance_id)
            _for_ids(conn, "DELETE FROM entity_inbox WHERE id IN ({})", result.consumed)
            _for_ids(conn, "UPDATE entity_inbox SET deferred = 1 WHERE id IN ({})", result.deferred)
            conn.execute(
                "UPDATE entities SET state = ?, last_modified_at = ?, locked_by = ?, "
                "lock_owner = ?, leased_by = NULL, dequeue_count = 0 WHERE instance_id = ?",
                (
                    entity.state,
                    _us(entity.last_modified_at),
                    entity.locked_by,
                    entity.lock_owner,
                    entity.instance_id,
                ),
            )
            conn.execute(
                "DELETE FROM entities WHERE instance_id = ? AND state IS NULL "
                "AND locked_by IS NULL AND NOT EXISTS "
                "(SELECT 1 FROM entity_inbox WHERE instance_id = ?)",
                (entity.instance_id, entity.instance_id),
            )
            _send(conn, result.messages, now_us)
            return _start_instances(conn, result.new_instances, now_us)

        created = await self._run_write(write)
        self.listener.entity_work_added()  # messages that arrived during the step
        if created or any(not is_entity_id(m.target_instance_id) for m in result.messages):
            self.listener.orchestration_work_added()

    async def postpone_entity(
        self,
        owner: str,
        entity_id: str,
        message_ids: Sequence[int],
        until: datetime,
        failed: bool = False,
    ) -> None:
        def write(conn: sqlite3.Connection) -> None:
            _check_entity_lease(conn, owner, entity_id)
            _for_ids(
                conn,
                "UPDATE entity_inbox SET visible_at = ? WHERE id IN ({})",
                message_ids,
                (_us(until),),
            )
            conn.execute(
                "UPDATE entities SET leased_by = NULL, "
                "dequeue_count = CASE WHEN ? THEN dequeue_count + 1 ELSE 0 END "
                "WHERE instance_id = ?",
                (failed, entity_id),
            )

        await self._run_write(write)
        self.listener.entity_work_added()

    # -- orchestration work ----------------------------------------------------------------

    async def lease_orchestrations(
        self, owner: str, now: datetime, limit: int
    ) -> Leased[OrchestrationWorkItem]:
        now_us = _us(now)

        def write(conn: sqlite3.Connection) -> Leased[OrchestrationWorkItem]:
            ids = _lease_next(
                conn,
                "SELECT m.instance_id FROM inbox m JOIN instances i USING (instance_id) "
                "WHERE m.visible_at <= ? AND i.locked_by IS NULL "
                "ORDER BY m.visible_at LIMIT ?",
                "UPDATE instances SET locked_by = ? WHERE instance_id IN ({marks})",
                owner,
                now_us,
                limit,
            )
            leased = Leased(_load_orchestrations(conn, ids, now_us) if ids else [])
            if len(ids) < limit:
                leased.next_at = _next_at(conn, _NEXT_MESSAGE)
            return leased

        return await self._run_write(write)

    async def read_inbox(self, owner: str, instance_id: str, now: datetime) -> list[InboxMessage]:
        now_us = _us(now)

        def read(conn: sqlite3.Connection) -> list[InboxMessage]:
            _check_lease(conn, owner, instance_id)
            return [
                InboxMessage(r[0], _event(r[1]))
                for r in conn.execute(
                    "SELECT id, event FROM inbox WHERE instance_id = ? AND visible_at <= ? "
                    "ORDER BY id",
                    (instance_id, now_us),
                )
            ]

        return await self._run_read(read)

    async def commit_step(
        self, owner: str, result: StepResult, lease_activities: int = 0
    ) -> Handed[ActivityWorkItem]:
        state = result.state

        def write(conn: sqlite3.Connection) -> tuple[list[str], Handed[ActivityWorkItem]]:
            _check_lease(conn, owner, state.instance_id)
            leased: Handed[ActivityWorkItem] = Handed()
            changed = _apply_step(conn, result, owner, lease_activities, leased)
            leased.waiting = _has_inbox(conn, state.instance_id)
            return changed, leased

        changed, leased = await self._run_write(write)
        self._after_step(result, changed, len(leased), leased.waiting)
        return leased

    async def commit_forced(self, result: StepResult, expected_update: datetime) -> bool:
        instance_id = result.state.instance_id

        def write(conn: sqlite3.Connection) -> list[str] | None:
            row = conn.execute(
                "SELECT status, last_updated_at FROM instances WHERE instance_id = ?",
                (instance_id,),
            ).fetchone()
            if row is None or row[0] in _TERMINAL or row[1] != _us(expected_update):
                return None
            conn.execute("DELETE FROM inbox WHERE instance_id = ?", (instance_id,))
            conn.execute("DELETE FROM activities WHERE instance_id = ?", (instance_id,))
            return _apply_step(conn, result)  # also clears the lease

        changed = await self._run_write(write)
        if changed is None:
            return False
        self._after_step(result, changed, 0, waiting=True)
        return True

    def _after_step(
        self, result: StepResult, changed: list[str], handed_over: int, waiting: bool
    ) -> None:
        # `waiting`: the instance has inbox events (arrived during the step, or timers), which
        # its lease hid from the orchestration processor until now. Without them and without
        # an outbox, waking the processor would only cost it a lease that finds nothing.
        if waiting or result.messages or result.new_instances:
            self.listener.orchestration_work_added()
        if len(result.activities) > handed_over:
            self.listener.activity_work_added()
        if any(is_entity_id(m.target_instance_id) for m in result.messages):
            self.listener.entity_work_added()
        for instance_id in changed:
            own = instance_id == result.state.instance_id
            self.listener.instance_changed(instance_id, result.state if own else None)

    async def postpone(
        self,
        owner: str,
        instance_id: str,
        message_ids: Sequence[int],
        until: datetime,
        failed: bool = False,
    ) -> None:
        def write(conn: sqlite3.Connection) -> None:
            _check_lease(conn, owner, instance_id)
            _for_ids(
                conn, "UPDATE inbox SET visible_at = ? WHERE id IN ({})", message_ids, (_us(until),)
            )
            conn.execute(
                "UPDATE instances SET locked_by = NULL, "
                "dequeue_count = CASE WHEN ? THEN dequeue_count + 1 ELSE 0 END "
                "WHERE instance_id = ?",
                (failed, instance_id),
            )

        await self._run_write(write)
        self.listener.orchestration_work_added()

    async def abandon_orchestration(
        self, owner: str, instance_id: str, failed: bool = False
    ) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE instances SET locked_by = NULL, "
                "dequeue_count = dequeue_count + (CASE WHEN ? THEN 1 ELSE 0 END) "
                "WHERE instance_id = ? AND locked_by = ?",
                (failed, instance_id, owner),
            )

        await self._run_write(write)
        self.listener.orchestration_work_added()

    # -- activity work ---------------------------------------------------------------------

    async def lease_activities(
        self, owner: str, now: datetime, limit: int
    ) -> Leased[ActivityWorkItem]:
        def write(conn: sqlite3.Connection) -> Leased[ActivityWorkItem]:
            rows = conn.execute(
                "SELECT id, instance_id, execution_id, event, dequeue_count FROM activities "
                "WHERE locked_by IS NULL AND visible_at <= ? ORDER BY visible_at, id LIMIT ?",
                (_us(now), limit),
            ).fetchall()
            if rows:
                conn.execute(
                    "UPDATE activities SET locked_by = ? "
                    f"WHERE id IN ({','.join('?' * len(rows))})",
                    (owner, *(r["id"] for r in rows)),
                )
            leased = Leased(
                ActivityWorkItem(
                    id=r["id"],
                    instance_id=r["instance_id"],
                    execution_id=r["execution_id"],
                    scheduled=_event(r["event"]),
                    dequeue_count=r["dequeue_count"] + 1,
                )
                for r in rows
            )
            if len(rows) < limit:
                leased.next_at = _next_at(conn, _NEXT_ACTIVITY)
            return leased

        return await self._run_write(write)

    async def complete_activity(
        self,
        owner: str,
        item: ActivityWorkItem,
        result: pb.HistoryEvent,
        lease_orchestration: bool = False,
        ahead: StepAhead | None = None,
    ) -> OrchestrationWorkItem | Handed[ActivityWorkItem] | None:
        instance_id = item.instance_id
        blob = result.SerializeToString()
        changed: list[str] = []

        def write(
            conn: sqlite3.Connection,
        ) -> Handed[ActivityWorkItem] | tuple[bool, OrchestrationWorkItem | None]:
            if ahead is None or not _as_found(conn, instance_id, item.execution_id, ahead):
                return _complete_activity(conn, owner, item, blob, lease_orchestration)
            _delete_activity(conn, owner, item)
            return _commit_ahead(conn, ahead, changed)

        done = await self._run_write(write)
        if isinstance(done, Handed):
            assert ahead is not None
            self._after_step(ahead.result, changed, len(done), done.waiting)
            return done
        delivered, work = done
        self._after_delivery(item, delivered, work)
        return work

    def _after_delivery(
        self, item: ActivityWorkItem, delivered: bool, work: OrchestrationWorkItem | None
    ) -> None:
        if delivered:
            if work is None:  # not handed over: the orchestration processor leases it
                self.listener.orchestration_work_added()
        else:
            log.warning(
                "%s: dropped the result of activity %d: the execution that scheduled it is gone",
                item.instance_id,
                item.scheduled.eventId,
            )

    async def abandon_activity(
        self, owner: str, item: ActivityWorkItem, delay: float, failed: bool = False
    ) -> None:
        visible = datetime.now(UTC) + timedelta(seconds=delay)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE activities SET locked_by = NULL, visible_at = ?, "
                "dequeue_count = dequeue_count + (CASE WHEN ? THEN 1 ELSE 0 END) "
                "WHERE id = ? AND locked_by = ?",
                (_us(visible), failed, item.id, owner),
            )

        await self._run_write(write)
        self.listener.activity_work_added()


def _settle(batch: list[_WriteSlot]) -> None:
    for slot in batch:
        slot.done.set()


def _commit_whole(conn: _WriterConnection, batch: list[_WriteSlot]) -> bool:
    """Run a batch's writes in one transaction without a savepoint each. Writes seldom fail
    (a lost lease, an existing instance id); when one does, nothing of the batch is kept and
    False is returned, and the writes run again, each in a savepoint of its own, so that only
    the failing one rolls back. Writes are functions of the store alone, safe to run again."""
    try:
        with _transaction(conn):
            for slot in batch:
                slot.outcome = outcome.Value(slot.fn(conn))
    except Exception:
        conn.cache.rollback()
        for slot in batch:
            slot.outcome = None
        return False
    conn.cache.commit()
    return True


def _exclusive_lock(path: str) -> IO[bytes]:
    """Hold `path`.lock for the life of the store.

    One process owns a store: it releases every lease it finds when it opens, so a second
    sidecar on the same file would steal work from the first. The OS drops the lock when the
    process dies, kill -9 included, so a crash never leaves the store locked.
    """
    lock_path = f"{path}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    lock_file = os.fdopen(fd, "r+b")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise StoreUnavailable(
            f"the store {path} is in use by another dt-trio process (it holds {lock_path}); "
            "stop that process or give this one another --db"
        ) from None
    return lock_file


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
    conn.execute(f"BEGIN {mode}")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # A failed COMMIT (disk full, busy) leaves the transaction open, and some errors roll
        # it back by themselves: either way the connection must come out of it usable.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _history(conn: sqlite3.Connection, instance_id: str) -> list[pb.HistoryEvent]:
    return [
        _event(r[0])
        for r in conn.execute(
            "SELECT event FROM history WHERE instance_id = ? ORDER BY seq", (instance_id,)
        )
    ]


# When the next message of an unleased owner becomes visible (asked after a short lease).
_NEXT_MESSAGE = (
    "SELECT MIN(m.visible_at) FROM inbox m JOIN instances i USING (instance_id) "
    "WHERE i.locked_by IS NULL"
)
_NEXT_ACTIVITY = "SELECT MIN(visible_at) FROM activities WHERE locked_by IS NULL"
_NEXT_ENTITY = (
    "SELECT MIN(m.visible_at) FROM entity_inbox m JOIN entities e "
    "USING (instance_id) WHERE m.deferred = 0 AND e.leased_by IS NULL"
)


def _next_at(conn: sqlite3.Connection, sql: str) -> datetime | None:
    return _dt(conn.execute(sql).fetchone()[0])


def _lease_next(
    conn: sqlite3.Connection, pick: str, lease: str, owner: str, now_us: int, limit: int
) -> list[str]:
    """Lease the first `limit` distinct unleased owners of visible messages, in time order.

    `pick` walks the visible messages by visible_at (an index) and names their owners; a few
    extra rows cover owners with several messages waiting. `lease` marks the chosen ones
    (its `{marks}` becomes their placeholders). Both are fixed statements of this module."""
    ids = list(dict.fromkeys(r[0] for r in conn.execute(pick, (now_us, limit * 4))))[:limit]
    if ids:
        conn.execute(lease.format(marks=",".join("?" * len(ids))), (owner, *ids))
    return ids


def _load_orchestrations(
    conn: sqlite3.Connection, ids: list[str], now_us: int
) -> list[OrchestrationWorkItem]:
    """The work items of instances just leased: row, history and visible inbox. Rows and
    histories come from the cache where it has them."""
    cache = _cache(conn)
    known = {i: e for i in ids if cache is not None and (e := cache.get(i)) is not None}
    marks = ",".join("?" * len(ids))
    attempts: dict[str, int] = {}
    states = {i: e[0] for i, e in known.items()}
    histories = {i: list(e[1]) for i, e in known.items()}
    if known:
        attempts.update(
            (r[0], r[1] + 1)
            for r in conn.execute(
                f"SELECT instance_id, dequeue_count FROM instances WHERE instance_id IN ({marks})",
                ids,
            )
        )
    missing = [i for i in ids if i not in known]
    if missing:
        unknown = ",".join("?" * len(missing))
        for r in conn.execute(
            f"SELECT {_INSTANCE_COLUMNS}, dequeue_count FROM instances "
            f"WHERE instance_id IN ({unknown})",
            missing,
        ):
            states[r["instance_id"]] = _row_to_state(r)
            attempts[r["instance_id"]] = r["dequeue_count"] + 1
        sizes = dict.fromkeys(missing, 0)
        for i in missing:
            histories[i] = []
        for r in conn.execute(
            f"SELECT instance_id, event FROM history WHERE instance_id IN ({unknown}) "
            "ORDER BY instance_id, seq",
            missing,
        ):
            histories[r[0]].append(_event(r[1]))
            sizes[r[0]] += len(r[1])
        if cache is not None:
            for i in missing:
                cache.put(i, (states[i], tuple(histories[i]), sizes[i]))
    inboxes: dict[str, list[InboxMessage]] = {i: [] for i in ids}
    for r in conn.execute(
        f"SELECT id, instance_id, event FROM inbox WHERE instance_id IN ({marks}) "
        "AND visible_at <= ? ORDER BY id",
        (*ids, now_us),
    ):
        inboxes[r[1]].append(InboxMessage(r[0], _event(r[2])))
    return [OrchestrationWorkItem(states[i], histories[i], inboxes[i], attempts[i]) for i in ids]


def _check_entity_lease(conn: sqlite3.Connection, owner: str, entity_id: str) -> None:
    row = conn.execute(
        "SELECT leased_by FROM entities WHERE instance_id = ?", (entity_id,)
    ).fetchone()
    if row is None or row[0] != owner:
        raise LockLost(f"entity '{entity_id}' is no longer leased by {owner}")


def _check_lease(conn: sqlite3.Connection, owner: str, instance_id: str) -> None:
    row = conn.execute(
        "SELECT locked_by FROM instances WHERE instance_id = ?", (instance_id,)
    ).fetchone()
    if row is None or row[0] != owner:
        raise LockLost(f"instance '{instance_id}' is no longer leased by {owner}")


def _insert_instance(
    conn: sqlite3.Connection,
    state: InstanceState,
    started: pb.HistoryEvent | None = None,
    visible_at: datetime | None = None,
    lease_to: str | None = None,
) -> int:
    """Insert the instance (leased to `lease_to`, if given) and, if given, its
    ExecutionStarted message, visible at `visible_at`; returns the message's id (0 without)."""
    conn.execute(
        f"INSERT INTO instances ({_INSTANCE_COLUMNS}, locked_by, dequeue_count) "
        f"VALUES ({','.join('?' * _INSTANCE_FIELDS)}, ?, ?)",
        (*_state_values(state), lease_to, 0),
    )
    cache = _cache(conn)
    if cache is not None:
        cache.put(state.instance_id, (state, (), 0))
    if started is None:
        return 0
    assert visible_at is not None
    cursor = conn.execute(
        "INSERT INTO inbox (instance_id, event, visible_at) VALUES (?, ?, ?)",
        (state.instance_id, started.SerializeToString(), _us(visible_at)),
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def _insert_message(
    conn: sqlite3.Connection,
    instance_id: str,
    event: pb.HistoryEvent,
    visible_us: int,
    execution_id: str | None = None,
) -> None:
    blob = event.SerializeToString()
    if is_entity_id(instance_id):
        # An entity comes into being with its first message.
        conn.execute(
            "INSERT OR IGNORE INTO entities (instance_id, last_modified_at) VALUES (?, ?)",
            (instance_id, visible_us),
        )
        conn.execute(
            "INSERT INTO entity_inbox (instance_id, event, visible_at) VALUES (?, ?, ?)",
            (instance_id, blob, visible_us),
        )
        return
    # A message to an instance that does not exist (or to an execution that is over) is
    # dropped, as the protocol expects.
    conn.execute(
        "INSERT INTO inbox (instance_id, event, visible_at) "
        "SELECT instance_id, ?, ? FROM instances WHERE instance_id = ? "
        "AND (? IS NULL OR execution_id = ?)",
        (blob, visible_us, instance_id, execution_id, execution_id),
    )


def _send(conn: sqlite3.Connection, messages: Sequence[OutboundMessage], now_us: int) -> None:
    for message in messages:
        visible = _us(message.visible_at) if message.visible_at else now_us
        _insert_message(
            conn, message.target_instance_id, message.event, visible, message.execution_id
        )


def _start_instances(
    conn: sqlite3.Connection, new_instances: Sequence[NewInstance], now_us: int
) -> list[str]:
    """Create the instances an orchestration or entity started; returns the created ids."""
    created = []
    for new in new_instances:
        row = conn.execute(
            "SELECT status FROM instances WHERE instance_id = ?",
            (new.state.instance_id,),
        ).fetchone()
        if row is not None and (not new.replace_finished or row["status"] not in _TERMINAL):
            if new.on_conflict is not None:
                _send(conn, [new.on_conflict], now_us)
            else:
                log.info(
                    "%s exists; the start asked for by an entity is dropped", new.state.instance_id
                )
            continue
        if row is not None:
            _delete_instances(conn, [new.state.instance_id])
        _insert_instance(
            conn, new.state, new.started, new.state.scheduled_start_at or new.state.created_at
        )
        created.append(new.state.instance_id)
    return created


def _delete_activity(conn: sqlite3.Connection, owner: str, item: ActivityWorkItem) -> None:
    deleted = conn.execute(
        "DELETE FROM activities WHERE id = ? AND locked_by = ?", (item.id, owner)
    ).rowcount
    if deleted != 1:
        raise LockLost(f"activity work item {item.id} is no longer leased by this worker")


def _as_found(
    conn: sqlite3.Connection, instance_id: str, execution_id: str, ahead: StepAhead
) -> bool:
    """Whether the instance is as a step run ahead of its lease found it: running that
    execution, leased by nobody, unchanged since, with nothing in its inbox."""
    row = conn.execute(
        "SELECT locked_by, last_updated_at, "
        "EXISTS (SELECT 1 FROM inbox WHERE inbox.instance_id = instances.instance_id) "
        "FROM instances WHERE instance_id = ? AND execution_id = ?",
        (instance_id, execution_id),
    ).fetchone()
    return row is not None and row[0] is None and row[1] == _us(ahead.found_update) and not row[2]


def _commit_ahead(
    conn: sqlite3.Connection, ahead: StepAhead, changed: list[str]
) -> Handed[ActivityWorkItem]:
    """Commit a step run ahead of its lease (see `StepAhead`); `changed` gets the ids of the
    instances whose state changed."""
    leased: Handed[ActivityWorkItem] = Handed()
    changed[:] = _apply_step(conn, ahead.result, ahead.owner, ahead.lease_activities, leased)
    leased.waiting = _has_inbox(conn, ahead.result.state.instance_id)
    return leased


def _complete_activity(
    conn: sqlite3.Connection,
    owner: str,
    item: ActivityWorkItem,
    result: bytes,
    lease_orchestration: bool,
) -> tuple[bool, OrchestrationWorkItem | None]:
    """Delete the activity and put its result in the inbox of its execution, if that still
    runs; with `lease_orchestration`, lease the instance too if nobody does. Whether the result
    was delivered, and the instance's work item if leased."""
    _delete_activity(conn, owner, item)
    now_us = _us(datetime.now(UTC))
    cursor = conn.execute(
        "INSERT INTO inbox (instance_id, event, visible_at) "
        "SELECT instance_id, ?, ? FROM instances WHERE instance_id = ? "
        "AND execution_id = ?",
        (result, now_us, item.instance_id, item.execution_id),
    )
    delivered = cursor.rowcount == 1
    if not (delivered and lease_orchestration):
        return delivered, None
    leased = conn.execute(
        "UPDATE instances SET locked_by = ? WHERE instance_id = ? AND locked_by IS NULL",
        (owner, item.instance_id),
    ).rowcount
    return delivered, _load_orchestrations(conn, [item.instance_id], now_us)[0] if leased else None


def _has_inbox(conn: sqlite3.Connection, instance_id: str) -> bool:
    row = conn.execute("SELECT 1 FROM inbox WHERE instance_id = ? LIMIT 1", (instance_id,))
    return row.fetchone() is not None


# Rows per statement of a bulk write (at most 5 parameters a row: well under sqlite's limit of
# 32,766 parameters a statement).
_ROWS_PER_STATEMENT = 500


@functools.lru_cache(maxsize=128)
def _placeholders(width: int, count: int) -> str:
    row = "?" if width == 1 else f"({','.join('?' * width)})"
    return ",".join([row] * count)


def _insert_rows(conn: sqlite3.Connection, into: str, rows: Sequence[tuple[object, ...]]) -> int:
    """Insert `rows` with `into` ("INSERT INTO t (a, b) VALUES") in statements of many rows.

    One statement is one sqlite call, and the writer's thread gives up the GIL once per call:
    row by row (`executemany` included) it waits to get it back after every row while the
    event loop's thread is busy, which made a step scheduling 1,000 activities commit in about
    40 ms under load instead of 8. Returns the last row's rowid (0 without rows): the rows of
    an AUTOINCREMENT table get consecutive ids, in order."""
    last = 0
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        cursor = conn.execute(
            f"{into} {_placeholders(len(chunk[0]), len(chunk))}",
            [value for row in chunk for value in row],
        )
        assert cursor.lastrowid is not None
        last = cursor.lastrowid
    return last


def _for_ids(
    conn: sqlite3.Connection, sql: str, ids: Sequence[int], before: tuple[object, ...] = ()
) -> None:
    """Run `sql` ("... WHERE id IN ({})", after the parameters `before`) for all `ids`, in
    statements of many ids (see `_insert_rows`)."""
    for start in range(0, len(ids), _ROWS_PER_STATEMENT):
        chunk = ids[start : start + _ROWS_PER_STATEMENT]
        conn.execute(sql.format(_placeholders(1, len(chunk))), (*before, *chunk))


def _apply_step(
    conn: sqlite3.Connection,
    result: StepResult,
    owner: str | None = None,
    lease_activities: int = 0,
    leased: list[ActivityWorkItem] | None = None,
) -> list[str]:
    """Write one step: history, inbox consumption, instance row (lease cleared), outbox.
    Returns the ids of the instances whose state changed."""
    state = result.state
    changed = [state.instance_id]
    if result.reset_history:
        conn.execute("DELETE FROM history WHERE instance_id = ?", (state.instance_id,))
        conn.execute("DELETE FROM activities WHERE instance_id = ?", (state.instance_id,))
    cache = _cache(conn)
    known = cache.get(state.instance_id) if cache is not None else None
    blobs = [e.SerializeToString() for e in result.history]
    if result.history:
        if result.reset_history:
            start = 0
        elif known is not None:
            start = len(known[1])
        else:
            start = conn.execute(
                "SELECT COALESCE(MAX(seq), -1) + 1 FROM history WHERE instance_id = ?",
                (state.instance_id,),
            ).fetchone()[0]
        _insert_rows(
            conn,
            "INSERT INTO history (instance_id, seq, event) VALUES",
            [(state.instance_id, start + i, blob) for i, blob in enumerate(blobs)],
        )
    _for_ids(conn, "DELETE FROM inbox WHERE id IN ({})", result.consumed)
    conn.execute(
        f"UPDATE instances SET ({_INSTANCE_COLUMNS}) = "
        f"({','.join('?' * _INSTANCE_FIELDS)}), locked_by = NULL, dequeue_count = 0 "
        "WHERE instance_id = ?",
        (*_state_values(state), state.instance_id),
    )
    now_us = _us(state.last_updated_at)
    # The first `lease_activities` activities go to `owner` as they are written (a hand-over;
    # their work items are appended to `leased`), the rest wait for the activity processor.
    handed = result.activities[:lease_activities] if leased is not None else []
    if handed:
        assert leased is not None
        last = _insert_rows(
            conn,
            "INSERT INTO activities (instance_id, execution_id, event, visible_at, locked_by) "
            "VALUES",
            [
                (a.instance_id, a.execution_id, a.scheduled.SerializeToString(), now_us, owner)
                for a in handed
            ],
        )
        first = last - len(handed) + 1
        leased.extend(
            ActivityWorkItem(first + i, a.instance_id, a.execution_id, a.scheduled, 1)
            for i, a in enumerate(handed)
        )
    if len(result.activities) > len(handed):
        _insert_rows(
            conn,
            "INSERT INTO activities (instance_id, execution_id, event, visible_at) VALUES",
            [
                (a.instance_id, a.execution_id, a.scheduled.SerializeToString(), now_us)
                for a in result.activities[len(handed) :]
            ],
        )
    if result.new_instances:
        changed += _start_instances(conn, result.new_instances, now_us)
    arrived: list[sqlite3.Row] = []
    if result.reset_history:
        # The new execution's start and carried-over events go before the events that
        # arrived during the step, which the old execution never saw.
        arrived = conn.execute(
            "SELECT event, visible_at FROM inbox WHERE instance_id = ? ORDER BY id",
            (state.instance_id,),
        ).fetchall()
        conn.execute("DELETE FROM inbox WHERE instance_id = ?", (state.instance_id,))
    _send(conn, result.messages, now_us)
    if arrived:
        _insert_rows(
            conn,
            "INSERT INTO inbox (instance_id, event, visible_at) VALUES",
            [(state.instance_id, row[0], row[1]) for row in arrived],
        )
    if cache is not None:
        if state.status.is_terminal:
            cache.put(state.instance_id, state)  # no more steps to serve; the row for readers
        elif result.reset_history:
            cache.put(state.instance_id, (state, tuple(result.history), sum(map(len, blobs))))
        elif known is not None:
            size = known[2] + sum(map(len, blobs))
            cache.put(state.instance_id, (state, known[1] + tuple(result.history), size))
    return changed


def _filter_sql(where: InstanceFilter) -> tuple[list[str], list[object]]:
    clauses: list[str] = []
    params: list[object] = []
    if where.statuses is not None:
        clauses.append(f"status IN ({','.join('?' * len(where.statuses))})")
        params += [int(s) for s in where.statuses]
    if where.created_from is not None:
        clauses.append("created_at >= ?")
        params.append(_us(where.created_from))
    if where.created_to is not None:
        clauses.append("created_at < ?")
        params.append(_us(where.created_to))
    if where.id_prefix:
        # A range on the primary key, so the prefix filter uses the index.
        clauses.append("instance_id >= ? AND instance_id < ?")
        params += [where.id_prefix, where.id_prefix + "\U0010ffff"]
    return clauses, params


def _with_finished_descendants(conn: sqlite3.Connection, ids: Sequence[str]) -> list[str]:
    """`ids` and their sub-orchestrations, at any depth, that are finished."""
    found = list(ids)
    frontier = list(ids)
    marks = ",".join("?" * len(_TERMINAL))
    while frontier:
        chunk, frontier = frontier[:500], frontier[500:]
        children = [
            r[0]
            for r in conn.execute(
                f"SELECT instance_id FROM instances WHERE parent_instance_id IN "
                f"({','.join('?' * len(chunk))}) AND status IN ({marks})",
                (*chunk, *_TERMINAL),
            )
        ]
        found += children
        frontier += children
    return list(dict.fromkeys(found))  # a child may also have matched the filter itself


def _delete_instances(conn: sqlite3.Connection, ids: Sequence[str]) -> None:
    for table in ("history", "inbox", "activities", "instances"):
        conn.executemany(f"DELETE FROM {table} WHERE instance_id = ?", [(i,) for i in ids])
    cache = _cache(conn)
    if cache is not None:
        for instance_id in ids:
            cache.put(instance_id, None)
