"""The sqlite store's connections: one writer with group commit, a pool of readers, and a
checkpointer.

Every call runs in a worker thread through `trio.to_thread.run_sync`. Writes go through one
writer connection, serialised by a CapacityLimiter of one; on a file, reads use a small pool of
reader connections so that they never wait behind a write transaction, and WAL checkpoints run
on a connection and in a thread of their own, never on the commit path. A private in-memory
database has the writer connection alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import outcome
import trio

from dt_trio._errors import StoreUnavailable
from dt_trio._log import get_logger
from dt_trio._metrics._tally import CommitStats
from dt_trio._store._sqlite._cache import InstanceCache, WriterConnection

log = get_logger(__name__)

T = TypeVar("T")
READERS = 4
# A WAL checkpoint copies the WAL into the database file and syncs both: sqlite runs one in the
# committing connection every 1,000 WAL pages by default, which held the commit that crossed
# the line (and every write queued behind it) for 80-200 ms under load, about once every 16
# orchestrations. Instead, the checkpointer (`run`) checkpoints after every CHECKPOINT_WRITES
# committed writes on its own connection, beside the writer (a PASSIVE checkpoint never
# blocks it); the writer's own checkpoint stays as a backstop, far off, should the
# checkpointer fall behind. Under steady load the WAL is only started again from its beginning
# when a checkpoint finds no commit after it (a lull): a WAL that grew beyond
# WAL_KEEP_BYTES is then cut back to that size.
CHECKPOINT_WRITES = 256
# After a batch of a single write, the writer task's thread waits this long for the next write
# once the queue is empty before it returns (see `_write_loop`): a write that comes meanwhile
# starts at once, without a turn of the event loop for the writer task and a hand-over to a
# thread. Not after a larger batch: writes that come in groups (under load) are better left to
# gather during the event loop's turn than taken one at a time by a thread woken per write,
# which cost the local API's hello cities about 3% of its throughput.
WRITER_LINGER_SECONDS = 0.01
BACKSTOP_CHECKPOINT_PAGES = 10_000
WAL_KEEP_BYTES = 16 * 1024 * 1024


class _Failed(Exception):
    """Rolls back the transaction of a lone write that failed."""


class _Lost(Exception):
    """A write of a batch failed in a way that made sqlite roll the whole transaction back:
    every write of the batch fails with `error`."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@dataclasses.dataclass(eq=False)
class _WriteSlot:
    """One write waiting for its turn in a group commit."""

    fn: Callable[[sqlite3.Connection], Any]
    outcome: outcome.Outcome[Any] | None = None
    done: trio.Event = dataclasses.field(default_factory=trio.Event)


class Connections:
    """The connections of one store: `path` is a file name, or "" for an in-memory database
    private to this object. `description` names the store in log lines and errors."""

    def __init__(
        self,
        path: str,
        description: str,
        synchronous: str = "NORMAL",
        on_fault: Callable[[str | None], None] | None = None,
    ) -> None:
        self.path = path
        self.description = description
        self._synchronous = synchronous
        # Told, in the event loop's thread, when writes begin failing for want of a usable
        # store (the reason) and when they work again (None).
        self._on_fault = on_fault
        self._token: trio.lowlevel.TrioToken | None = None
        self._writer: WriterConnection | None = None
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = []
        self._write_limiter = trio.CapacityLimiter(1)
        # The queue and the flags are shared with the writer thread (see `_write_loop`).
        self._queue_lock = threading.Lock()
        self._write_queue: list[_WriteSlot] = []
        self._writing = False
        self._lingering = False  # the writer thread waits on `_queued` for a write
        self._queued = threading.Condition(self._queue_lock)
        self._writer_wakeup: trio.Event | None = None
        # The checkpointer's connection (on a file), and what tells it to run (see `run`).
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpoint_limiter = trio.CapacityLimiter(1)
        self._checkpoint_due: trio.Event | None = None
        self._since_checkpoint = 0  # writes committed since the checkpointer was told
        self._read_limiter = trio.CapacityLimiter(READERS)
        self._memory_uri = f"file:dt-trio-{uuid.uuid4().hex}?mode=memory&cache=shared"
        # The database file, open and locked while this store owns it (see `_hold`), and
        # whether this store created it.
        self._held: _Held | None = None
        self._faulty = False  # the last write failed for want of a usable store
        # Each group commit's time and size (for /metrics), counted by the writer thread.
        self.stats = CommitStats()

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

    def _open_sync(
        self,
        check: Callable[[sqlite3.Connection], None],
        prepare: Callable[[sqlite3.Connection], None],
    ) -> None:
        if self.path:
            self._held = _hold(self.path)
        writer = self._connect(WriterConnection)
        assert isinstance(writer, WriterConnection)
        writer.cache = InstanceCache()
        if self.path:
            # Before anything is written: another program's database stays as it is.
            check(writer)
            writer.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode loses nothing when the process dies; only an OS crash or power
            # loss can roll back the last commits. FULL syncs the WAL at every commit.
            writer.execute(f"PRAGMA synchronous={self._synchronous}")
            writer.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_CHECKPOINT_PAGES}")
            writer.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
        writer.execute("PRAGMA foreign_keys=OFF")
        # Statement journals (each write of a group commit runs in a savepoint) in memory,
        # not in a temporary file created and unlinked per transaction.
        writer.execute("PRAGMA temp_store=MEMORY")
        prepare(writer)
        self._writer = writer
        if self.path:
            for _ in range(READERS):
                self._readers.put(self._connect())
            self._checkpointer = self._connect()

    async def open(
        self,
        check: Callable[[sqlite3.Connection], None],
        prepare: Callable[[sqlite3.Connection], None],
    ) -> None:
        """Open the store: create the file (owner-only) if it does not exist, take it for
        this process, `check` that it is a store (before anything is written to it), then
        `prepare` it (the schema). On failure nothing is left behind: a file this call
        created is removed again.

        StoreUnavailable if the file is held by another store (in this process or another),
        is refused by `check`, or cannot be opened."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            await trio.to_thread.run_sync(
                self._open_sync, check, prepare, limiter=self._write_limiter
            )
        except BaseException as exc:
            await self._close(discard=True)
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise StoreUnavailable(
                    f"cannot open the store {self.description}: {_open_problem(self.path, exc)}"
                ) from exc
            raise

    async def close(self) -> None:
        await self._close()

    async def _close(self, discard: bool = False) -> None:
        """Close every connection, then let go of the file; with `discard`, a file this store
        created is removed first (with the lock still held, so nobody has taken it)."""

        def close_all() -> None:
            self._writer = None  # writes, and reads from its cache, now fail: not open
            self._checkpointer = None
            for conn in self._all:
                conn.close()
            self._all.clear()
            held, self._held = self._held, None
            if held is not None:
                if discard and held.created:
                    for suffix in ("", "-wal", "-shm", "-journal"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.path + suffix)
                held.release()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close_all, limiter=self._write_limiter)

    # -- writes: group commit ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer: commits the queued writes (see `write`) until cancelled, then what is
        still queued; beside it, on a file, the checkpointer. The hub runs them beside
        everything that writes, and stops them last. Without them (a store used on its own)
        each write's caller drives the commits, and the writer checkpoints (far apart)."""
        async with trio.open_nursery() as nursery:
            if self._checkpointer is not None:
                self._checkpoint_due = trio.Event()
                nursery.start_soon(self._checkpoints, self._checkpointer)
            try:
                await self._commit_batches(task_status)
            finally:
                self._checkpoint_due = None
                nursery.cancel_scope.cancel()

    async def _checkpoints(self, conn: sqlite3.Connection) -> None:
        """Checkpoint the WAL whenever CHECKPOINT_WRITES more writes were committed."""
        while self._checkpoint_due is not None:
            await self._checkpoint_due.wait()
            self._checkpoint_due = trio.Event()
            await trio.to_thread.run_sync(_checkpoint, conn, limiter=self._checkpoint_limiter)

    async def _commit_batches(self, task_status: trio.TaskStatus[None]) -> None:
        wakeup = self._writer_wakeup = trio.Event()
        task_status.started()
        try:
            while True:
                await wakeup.wait()
                wakeup = self._writer_wakeup = trio.Event()
                await self._drive(WRITER_LINGER_SECONDS)
        finally:
            self._writer_wakeup = None
            if self._writing:  # woken, but cancelled before it drove
                await self._drive()

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
            if self._lingering:
                self._queued.notify()
        if idle:
            if self._writer_wakeup is not None:
                self._writer_wakeup.set()
            else:
                await self._drive()
        if not slot.done.is_set():
            await slot.done.wait()
        assert slot.outcome is not None
        return slot.outcome.unwrap()  # type: ignore[no-any-return]

    async def _drive(self, linger: float = 0.0) -> None:
        """Commit batches until the queue is empty, and has stayed empty for `linger`
        seconds (shielded: others' writes are queued)."""
        token = trio.lowlevel.current_trio_token()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(
                self._write_loop, token, linger, limiter=self._write_limiter
            )

    def _write_loop(self, token: trio.lowlevel.TrioToken, linger: float) -> None:
        """In the writer thread: commit batch after batch until the queue is empty, and
        has stayed empty for `linger` seconds.

        The next batch starts as soon as the last one is committed, with what queued up
        meanwhile: no round trip through the event loop between two transactions. Each
        batch's writers are woken as it commits (`run_sync_soon` keeps their order). While
        the thread lingers (after a single write, see WRITER_LINGER_SECONDS), a write wakes it
        directly (`write`): steps that follow each other one at a time (a chain of
        activities) commit without the writer task's turn of the event loop and a hand-over
        to a thread each."""
        alone = False  # the last batch was a single write
        while True:
            with self._queue_lock:
                if not self._write_queue and linger and alone:
                    self._lingering = True
                    self._queued.wait(linger)
                    self._lingering = False
                batch, self._write_queue = self._write_queue, []
                if not batch:
                    self._writing = False
                    return
            alone = len(batch) == 1
            started = time.perf_counter()
            try:
                self._write_batch(batch)
            except Exception as exc:  # a bug: fail this batch's writes, not the next ones
                log.exception("the store's writer failed")
                for slot in batch:
                    if slot.outcome is None:
                        slot.outcome = outcome.Error(exc)
            self.stats.committed(time.perf_counter() - started, len(batch))
            token.run_sync_soon(self._committed, batch)

    def _committed(self, batch: list[_WriteSlot]) -> None:
        """In the event loop's thread, once `batch` is committed: wake its writers, and the
        checkpointer if its turn has come."""
        for slot in batch:
            slot.done.set()
        self._since_checkpoint += len(batch)
        if self._since_checkpoint >= CHECKPOINT_WRITES and self._checkpoint_due is not None:
            self._since_checkpoint = 0
            self._checkpoint_due.set()

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
                        if not conn.in_transaction:
                            # sqlite rolled the whole transaction back itself (a full disk, an
                            # I/O error): the writes before this one are gone with it.
                            raise _Lost(exc) from exc
                        conn.execute("ROLLBACK TO one_write")
                        cache.undo_to(mark)
                    if not alone:
                        conn.execute("RELEASE one_write")
            committed = True
        except _Failed:
            pass  # the transaction was rolled back; the write's outcome says why
        except _Lost as lost:
            for slot in batch:
                slot.outcome = outcome.Error(lost.error)
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
        """Log the start and the end of a store fault once each, not once per write, and tell
        `on_fault` (in the event loop's thread)."""
        if fault is not None and not self._faulty:
            self._faulty = True
            log.error("%s (%s); callers get UNAVAILABLE until it clears", fault, self.description)
        elif fault is None and self._faulty:
            self._faulty = False
            log.warning("the store %s is writable again", self.description)
        else:
            return
        if self._on_fault is not None and self._token is not None:
            reason = str(fault) if fault is not None else None
            self._token.run_sync_soon(self._on_fault, reason)

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


def _checkpoint(conn: sqlite3.Connection) -> None:
    """Copy what the WAL holds into the database file (as far as readers allow), without
    blocking the writer. A failure leaves the WAL as it is: the writer reports store faults."""
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.Error as exc:
        log.debug("a WAL checkpoint failed: %s", exc)


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


# The stores this process holds, by their database file's identity (st_dev, st_ino).
_held_here: set[tuple[int, int]] = set()
_held_here_lock = threading.Lock()


@dataclasses.dataclass
class _Held:
    """A database file this store holds: open, and locked for the life of the store."""

    fd: int
    identity: tuple[int, int]
    created: bool  # this store made the file

    def release(self) -> None:
        os.close(self.fd)  # drops the lock
        with _held_here_lock:
            _held_here.discard(self.identity)


def _hold(path: str) -> _Held:
    """Open the database file `path` (creating it, owner-only, if it does not exist) and take
    it for this store: an exclusive flock on the file itself.

    One process owns a store: it releases every lease it finds when it opens, so a second
    sidecar on the same file would steal work from the first. The lock is on the file, not on
    a name beside it, so no spelling of its path (a symlink, a hard link, `..`) gets around it;
    the OS drops it when the process dies, kill -9 included, so a crash never leaves the store
    locked. A file that another store of this process holds is refused before it is opened:
    closing a descriptor of it would drop the sqlite locks that store holds on it.
    """
    while True:
        with contextlib.suppress(FileNotFoundError):
            _check_not_held_here(path, _identity(os.stat(path)))
        created = False
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue  # made meanwhile: open that one
            created = True
        try:
            info = os.fstat(fd)
            with _held_here_lock:
                _check_not_held_here(path, _identity(info))
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise _in_use(path, "another dt-trio process") from None
                # A start that failed may have removed the file between our open and our
                # lock: then lock the file that the path names now.
                try:
                    same = os.path.samestat(info, os.stat(path))
                except FileNotFoundError:
                    same = False
                if same:
                    _held_here.add(_identity(info))
                    return _Held(fd, _identity(info), created)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _check_not_held_here(path: str, identity: tuple[int, int]) -> None:
    if identity in _held_here:
        raise _in_use(path, "another store of this process")


def _in_use(path: str, holder: str) -> StoreUnavailable:
    real = os.path.realpath(path)
    spelled = path if real == os.path.abspath(path) else f"{path} (that is {real})"
    return StoreUnavailable(
        f"the store {spelled} is in use by {holder}; stop that process or give this one "
        "another --db"
    )


def _open_problem(path: str, exc: sqlite3.Error | OSError) -> str:
    """Why the store `path` cannot be opened, in terms of what the user gave (the store and
    its directory), not of the files made beside it."""
    if path:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            return f"the directory {directory} does not exist"
        if not os.access(directory, os.W_OK):
            return (
                f"the directory {directory} is not writable (sqlite keeps the store's journal "
                "beside it): give --db a file in a writable directory"
            )
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


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
