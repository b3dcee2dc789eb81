"""The sqlite store's connections: one writer with group commit, and a pool of readers.

Every call runs in a worker thread through `trio.to_thread.run_sync`. Writes go through one
writer connection, serialised by a CapacityLimiter of one; on a file, reads use a small pool of
reader connections so that they never wait behind a write transaction. A private in-memory
database has the writer connection alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import pathlib
import queue
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

import outcome
import trio

from dt_trio._errors import StoreUnavailable
from dt_trio._store._sqlite._cache import InstanceCache, WriterConnection

log = logging.getLogger(__name__)

T = TypeVar("T")
READERS = 4


class _Failed(Exception):
    """Rolls back the transaction of a lone write that failed."""


@dataclasses.dataclass(eq=False)
class _WriteSlot:
    """One write waiting for its turn in a group commit."""

    fn: Callable[[sqlite3.Connection], Any]
    outcome: outcome.Outcome[Any] | None = None
    done: trio.Event = dataclasses.field(default_factory=trio.Event)


class Connections:
    """The connections of one store: `path` is a file name, or "" for an in-memory database
    private to this object. `description` names the store in log lines and errors."""

    def __init__(self, path: str, description: str) -> None:
        self.path = path
        self.description = description
        self._writer: WriterConnection | None = None
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

    @property
    def cache(self) -> InstanceCache | None:
        """The writer's cache while the store is open (its `row` is safe from any thread)."""
        writer = self._writer
        return writer.cache if writer is not None else None

    # -- opening and closing -----------------------------------------------------------------

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

    def _open_sync(self, prepare: Callable[[sqlite3.Connection], None]) -> None:
        if self.path:
            self._lock_file = _exclusive_lock(self.path)
            file = pathlib.Path(self.path)
            if not file.exists():
                # Owner-only: the store holds every payload of every orchestration.
                file.touch(mode=0o600)
        writer = self._connect(WriterConnection)
        assert isinstance(writer, WriterConnection)
        writer.cache = InstanceCache()
        if self.path:
            writer.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode loses nothing when the process dies; only an OS crash or power
            # loss can roll back the last commits.
            writer.execute("PRAGMA synchronous=NORMAL")
        writer.execute("PRAGMA foreign_keys=OFF")
        # Statement journals (each write of a group commit runs in a savepoint) in memory,
        # not in a temporary file created and unlinked per transaction.
        writer.execute("PRAGMA temp_store=MEMORY")
        prepare(writer)
        self._writer = writer
        if self.path:
            for _ in range(READERS):
                self._readers.put(self._connect())

    async def open(self, prepare: Callable[[sqlite3.Connection], None]) -> None:
        """Open the connections; `prepare` runs on the writer first (the schema)."""
        try:
            await trio.to_thread.run_sync(self._open_sync, prepare, limiter=self._write_limiter)
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

    # -- writes: group commit ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer: commits the queued writes (see `write`) until cancelled, then what is
        still queued. The hub runs it beside everything that writes, and stops it last.
        Without it (a store used on its own) each write's caller drives the commits."""
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

    def busy(self) -> bool:
        return self._writing

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in a write transaction, grouped with the writes waiting beside it.

        Group commit: writes that arrive while a transaction is running wait, then all run in
        the next one, each in a savepoint of its own, so one failing write (a lost lease, say)
        rolls back alone. The writer task (`run`) drives the batches, or, while it does not
        run, whoever finds no transaction running; either way that loop is shielded, so a
        cancelled caller cannot strand the others. `fn` must be a function of the store
        alone: a batch that fails is run again, write by write.
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
            token.run_sync_soon(_wake_writers, batch)

    def _write_batch(self, batch: list[_WriteSlot]) -> None:
        conn = self._writer
        if conn is None:
            for slot in batch:
                slot.outcome = outcome.Error(StoreUnavailable("the store is not open"))
            return
        if len(batch) > 1 and _commit_whole(conn, batch):
            self._note_health(None)
            return
        cache = conn.cache
        # A lone write needs no savepoint: its failure rolls back the whole transaction.
        alone = len(batch) == 1
        committed = False
        try:
            with transaction(conn):
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

    # -- reads ---------------------------------------------------------------------------

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in a read transaction of its own (on a file, beside the writer's)."""
        if self._writer is None:
            raise StoreUnavailable("the store is not open")
        if not self.path:
            # A private memory database has one connection: its reads queue with the writes
            # (the writer's thread runs batch after batch while writes keep coming).
            return await self.write(fn)

        def call() -> T:
            conn = self._readers.get()
            try:
                with transaction(conn, mode="DEFERRED"):
                    return fn(conn)
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"the store cannot read: {exc}") from exc
            finally:
                self._readers.put(conn)

        return await trio.to_thread.run_sync(call, limiter=self._read_limiter)


def _wake_writers(batch: list[_WriteSlot]) -> None:
    for slot in batch:
        slot.done.set()


def _commit_whole(conn: WriterConnection, batch: list[_WriteSlot]) -> bool:
    """Run a batch's writes in one transaction without a savepoint each. Writes seldom fail
    (a lost lease, an existing instance id); when one does, nothing of the batch is kept and
    False is returned, and the writes run again, each in a savepoint of its own, so that only
    the failing one rolls back. Writes are functions of the store alone, safe to run again."""
    try:
        with transaction(conn):
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
def transaction(conn: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
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
