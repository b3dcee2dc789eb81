"""The PostgreSQL store: several sidecars on one database.

Most transactions are one hop to a worker thread (`trio.to_thread.run_sync`, a CapacityLimiter
the size of the connection pool) running psycopg 3 synchronously: psycopg's async API and
asyncpg are asyncio-only. The hot statements are sent from the event loop's thread instead,
on connections of their own in libpq's non-blocking pipeline mode (see `_direct`): the
writers' batches, and the starts and reads a client waits for. The store's own duties run in
`run`, in the hub's nursery:

- the writers: the commits made most (one call of a function of the schema each) are queued
  and written in batches by two tasks, each batch pipelined on a connection of its writer's in
  one round trip, each commit its own transaction (fenced by its own lease: a refused one
  leaves the others written); see `_write_batches`;
- renewal: every lease this process holds is renewed every ttl/3, one statement per table;
- the notifier: what commits here woke is sent to the other sidecars, while there are any
  (see `_notify` and `_peers`);
- the listener: a LISTEN connection watched without a thread (`trio.lowlevel.wait_readable`
  on its socket), which passes the other sidecars' wake-ups to this hub;
- the loop's connections, the writers' and one for lone statements a client waits for (a
  start, a read), used while it is free: each made, and made again when lost, by a task of
  its own (see `_direct`);
- the fallback poll: about once a second (jittered), one statement clears expired leases and
  asks whether anything is visible that nobody holds, for wake-ups that were lost.

Leases are on the database's clock (`now()`), fenced by owner and epoch (see `_apply`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import outcome
import psycopg
import psycopg.errors
import trio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from dt_trio._core import EntityState, InboxMessage, InstanceState, Status, lock_is_orphaned
from dt_trio._core._commit import (
    ActivityWorkItem,
    Applied,
    Commit,
    Creatable,
    EntityWorkItem,
    Holds,
    Lease,
    OrchestrationWorkItem,
    Wakeups,
    WorkKind,
    wakeups,
)
from dt_trio._errors import InvalidRequest, LockLost, StoreUnavailable
from dt_trio._log import get_logger
from dt_trio._metrics._tally import CommitStats
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
from dt_trio._store._postgres import _apply, _arrays
from dt_trio._store._postgres._apply import LEASED_INSTANCE, TERMINAL, Call, Tx
from dt_trio._store._postgres._direct import Answer, Fallback, LoopConnection, Lost, closed
from dt_trio._store._postgres._notify import NOTIFY_INTERVAL, Notice, Outbox, wakeups_of
from dt_trio._store._postgres._rows import (
    ENTITY_COLUMNS,
    INSTANCE_COLUMNS,
    event,
    from_us,
    to_entity,
    to_state,
    us,
    utc,
)
from dt_trio._store._postgres._schema import ensure_schema, schema_name
from dt_trio._store._query import Conditions, split_page
from dt_trio._store._select import DEFAULT_HUB, DEFAULT_LEASE_TTL

log = get_logger(__name__)
T = TypeVar("T")

DEFAULT_POOL_SIZE = 8
# A statement that runs longer is cancelled (and the caller gets UNAVAILABLE).
STATEMENT_TIMEOUT_MS = 30_000
# Waiting for a pooled connection (the server is down or restarting) gives up after this long.
CONNECT_TIMEOUT = 2.0
# The fallback poll's period, jittered by a quarter either way.
POLL_SECONDS = 1.0
# At most this many batches of commits are written at once (each on a connection of its own).
WRITERS = 2
# A writer's batch, at most: its parameters are dumped in the event loop's thread at once.
BATCH_LIMIT = 128
# Deadlocks and serialization failures are retried this many times.
RETRIES = 8
# While the LISTEN connection cannot be made again, retry this often (at most).
RELISTEN_SECONDS = 1.0
# How long a sidecar that was seen listening counts as there (see `_peers`); and how long
# after it starts listening a sidecar wakes everything once more, by when every other one
# has polled and seen it (longer than the poll's longest period).
PEERS_SEEN_FOR = 3 * POLL_SECONDS
LISTEN_SETTLES = 2 * POLL_SECONDS
# The application names of the event loop's connections (see `_direct`): for lone statements
# a client waits for, and the writers'.
LOOP_CONNECTION = "dt-trio loop"
WRITER_CONNECTION = "dt-trio writer"


def describe(address: str) -> str:
    """`postgres::host:port/dbname`: the address without the user or the password."""
    try:
        info = conninfo_to_dict(address)
    except psycopg.ProgrammingError as exc:
        raise StoreUnavailable(f"invalid PostgreSQL address: {exc}") from None
    host = info.get("host") or "localhost"
    port = info.get("port") or "5432"
    return f"postgres::{host}:{port}/{info.get('dbname') or info.get('user') or ''}"


@dataclasses.dataclass
class Counts:
    """What a store sent the server: statements, transactions (each adds a BEGIN and a COMMIT
    to its statements' round trips), pipelines (the writers' batches: their statements are
    sent together and answered together, one round trip each), and the steps it wrote. For
    the bench; updated from worker threads without a lock (a count may miss one now and
    then)."""

    statements: int = 0
    transactions: int = 0
    pipelined: int = 0  # statements sent in pipelines
    pipelines: int = 0
    steps: int = 0  # orchestration steps written

    @property
    def round_trips(self) -> int:
        return self.statements - self.pipelined + self.pipelines + 2 * self.transactions


@dataclasses.dataclass
class _Held:
    """A lease this process holds and, for an instance, its history's length then."""

    lease: Lease
    history: int = 0


@dataclasses.dataclass(eq=False)
class _Queued:
    """A commit of one call waiting for the writers (see `PostgresBackend._write_batches`): what
    makes its call, its time and leases (see `Tx`), and once written its transaction and what
    came of it."""

    prepare: Callable[[Tx], Call]
    now: datetime
    history_at: Mapping[str, int]
    tx: Tx | None = None
    outcome: outcome.Outcome[Applied] | None = None
    done: trio.Event = dataclasses.field(default_factory=trio.Event)


class PostgresBackend:
    """The PostgreSQL implementation of `dt_trio._store.Backend`.

    `address` is a libpq URL (postgresql://user:password@host:port/dbname); `hub` names the
    task hub (its tables live in the schema `dt_trio_<hub>`, so hubs share a database);
    `lease_ttl` is how long a lease lasts unless renewed (in seconds); `pool_size` bounds the
    connections (and the transactions in flight). `functions`: the commits made most are one
    call of a function of the schema each; without, every commit takes the general way (the
    tests run both).
    """

    def __init__(
        self,
        address: str,
        hub: str = DEFAULT_HUB,
        listener: StoreListener | None = None,
        *,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        pool_size: int = DEFAULT_POOL_SIZE,
        functions: bool = True,
        durability: Durability = Durability.NORMAL,
    ) -> None:
        if lease_ttl <= 0:
            raise ValueError(f"the lease time to live must be positive, not {lease_ttl}")
        self.address = address
        self.hub = hub
        self.schema = schema_name(hub)
        self.description = describe(address) + ("" if hub == DEFAULT_HUB else f"#{hub}")
        self.listener: StoreListener = listener or NullListener()
        self.lease_ttl = lease_ttl
        self._ttl = timedelta(seconds=lease_ttl)
        self._pool_size = pool_size
        self._functions = functions
        self._durability = durability
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._limiter = trio.CapacityLimiter(pool_size)
        self._notify_limiter = trio.CapacityLimiter(1)
        self._held: dict[WorkKind, dict[str | int, _Held]] = {k: {} for k in WorkKind}
        self._id = uuid.uuid4().hex  # this store in the notifications it sends
        self._outbox = Outbox(self._id)
        # The other sidecars of this hub, as this one knows them: the application name of
        # the LISTEN connections, this one's (its backend's pid), and until when another was
        # seen (see `_peers`).
        self._listener_name = f"dt-trio listening {self.schema}"[:63]  # NAMEDATALEN - 1
        self._listener_pid = 0
        # Lone statements a client waits for, from the event loop's thread (see `_direct`).
        self._loop_conn = LoopConnection(functools.partial(self._connect, LOOP_CONNECTION))
        self._peers_until = -math.inf
        self._faulty = False
        self._fault_lock = threading.Lock()
        # The commits queued for the writer tasks, while they run (see `_write_batches`).
        self._writing = False
        self._queue: list[_Queued] = []
        self._queued = trio.lowlevel.ParkingLot()  # the idle writers
        self.counts = Counts()
        # Each commit's transaction, or the writer's batch of them, for /metrics.
        self.commit_stats = CommitStats()

    # -- connections ----------------------------------------------------------------------

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        counts = self.counts

        class Counted(psycopg.Cursor[Any]):
            def execute(self, *args: Any, **kwargs: Any) -> Counted:
                counts.statements += 1
                return super().execute(*args, **kwargs)

        conn.cursor_factory = Counted
        _arrays.register(conn.adapters)
        conn.execute(
            sql.SQL(
                "SET search_path TO {}; SET TimeZone TO 'UTC'; SET statement_timeout TO {}; "
                "SET idle_in_transaction_session_timeout TO {}"
            ).format(
                sql.Identifier(self.schema),
                sql.Literal(STATEMENT_TIMEOUT_MS),
                sql.Literal(2 * STATEMENT_TIMEOUT_MS),
            )
        )
        if self._durability is Durability.FULL:
            # Whatever the server's default: a commit is answered once it is on disk.
            conn.execute("SET synchronous_commit TO on")

    def _connect(self, name: str = "dt-trio") -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            self.address, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT) + 1,
            application_name=name,
        )  # fmt: skip
        try:
            self._configure(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_sync(self) -> None:
        # A connection of its own first: its errors (no such database, authentication) say
        # more than a pool that times out.
        with psycopg.connect(
            self.address, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT) + 1,
            application_name="dt-trio",
        ) as conn:  # fmt: skip
            ensure_schema(conn, self.schema, self._id)
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self.address,
            kwargs={"autocommit": True, "application_name": "dt-trio"},
            min_size=min(2, self._pool_size),
            max_size=self._pool_size + 1,  # the notifier's too
            configure=self._configure,
            timeout=CONNECT_TIMEOUT,
            reconnect_timeout=0,  # keep trying while the server is away
            open=False,
            name=f"dt-trio {self.description}",
        )
        pool.open(wait=True, timeout=CONNECT_TIMEOUT * 2)
        self._pool = pool

    async def open(self) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        try:
            await trio.to_thread.run_sync(self._open_sync)
        except (psycopg.Error, PoolTimeout, OSError) as exc:
            await self.close()
            raise StoreUnavailable(f"cannot open the store {self.description}: {exc}") from exc
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Give back the leases this process holds (others take them over at once, not when
        they expire), tell the other sidecars, and close the connections."""
        self._loop_conn.lose()
        pool, self._pool = self._pool, None
        if pool is None:
            return

        def give_back() -> None:
            with contextlib.suppress(psycopg.Error, PoolTimeout):
                held = {
                    k: {key: h.lease for key, h in v.items()} for k, v in self._held.items() if v
                }
                if held:
                    with pool.connection(timeout=1.0) as conn:
                        _give_back(conn, held)
                        everything = Notice(self._id, frozenset(WorkKind), ())
                        conn.execute(*_notice(self.schema, everything.encode()))
            pool.close(timeout=2.0)

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(give_back)
        for leases in self._held.values():
            leases.clear()
        counts = self.counts
        log.info(
            "%s: %d statements in %d transactions (%d round trips) for %d steps",
            self.description,
            counts.statements,
            counts.transactions,
            counts.round_trips,
            counts.steps,
        )

    # -- running transactions -------------------------------------------------------------

    async def _hop(
        self,
        fn: Callable[[psycopg.Connection[Any]], T],
        transaction: bool = True,
        limiter: trio.CapacityLimiter | None = None,
        retry_lost: bool = True,
    ) -> T:
        """Run `fn` on a pooled connection in a worker thread, in a transaction (or in
        autocommit mode: each statement its own), with retries (see `_call`)."""
        return await trio.to_thread.run_sync(
            functools.partial(self._call, fn, transaction, retry_lost),
            limiter=limiter or self._limiter,
        )

    def _call(
        self, fn: Callable[[psycopg.Connection[Any]], T], transaction: bool, retry_lost: bool
    ) -> T:
        """In a worker thread: `fn` in a transaction, tried again after a deadlock, a
        serialization failure, a concurrent insert of the same instance, or a connection
        lost before the commit was sent. Without a transaction, a lost connection is tried
        again only with `retry_lost` (reads, and writes that may run twice): a statement may
        have committed before the connection was lost. Errors of the store become
        StoreUnavailable."""
        attempt = 0
        while True:
            attempt += 1
            pool = self._pool
            if pool is None:
                raise StoreUnavailable(f"the store {self.description} is not open")
            committing = False
            broken = False
            try:
                with pool.connection() as conn:
                    if closed(conn.pgconn):
                        # The server closed it while it was idle (a restart, a terminated
                        # backend): nothing was sent on it, so another one may be tried.
                        conn.close()
                        attempt -= 1
                        continue
                    try:
                        if not transaction:
                            value = fn(conn)
                        else:
                            self.counts.transactions += 1
                            with conn.transaction():
                                value = fn(conn)
                                committing = True
                    finally:
                        broken = conn.broken
                self._note_health(None)
                return value
            except _RETRIED as exc:
                if attempt >= RETRIES:
                    raise self._unavailable(f"gave up after {attempt} attempts: {exc}") from exc
                log.debug("retrying a transaction: %s", exc.diag.message_primary)
            except psycopg.errors.UniqueViolation as exc:
                constraint = exc.diag.constraint_name
                if constraint == "history_pkey":
                    # The backstop of the leases: another writer wrote this step first.
                    raise LockLost(
                        f"another process already wrote this step ({exc.diag.message_detail})"
                    ) from exc
                if constraint != "instances_pkey" or attempt >= RETRIES:
                    raise
                # two creations of one instance at once: the retry's guard sees the winner
            except (psycopg.errors.DataError, psycopg.errors.ProgramLimitExceeded) as exc:
                raise InvalidRequest(
                    "PostgreSQL cannot store this request's data: "
                    f"{exc.diag.message_primary or str(exc).strip()}"
                ) from exc
            except psycopg.OperationalError as exc:
                # The server said it ended the session (a terminated backend, a shutdown):
                # what was sent on it did not commit.
                ended = isinstance(exc, _SESSION_ENDED)
                if (
                    broken
                    and (ended or (not committing and (transaction or retry_lost)))
                    and (attempt < 3)
                ):
                    # A connection the server dropped (a restart, a terminated backend) before
                    # the commit, or one whose work may run twice: try another, and drop the
                    # pool's dead ones first.
                    with contextlib.suppress(Exception):
                        pool.check()
                    continue
                raise self._unavailable(str(exc).strip()) from exc
            except PoolTimeout as exc:
                raise self._unavailable(f"no connection: {exc}") from exc
            time.sleep(random.uniform(0, 0.001 * 2 ** min(attempt, 6)))

    def _unavailable(self, why: str) -> StoreUnavailable:
        fault = StoreUnavailable(f"the store {self.description} cannot be used: {why}")
        self._note_health(fault)
        return fault

    def _note_health(self, fault: StoreUnavailable | None) -> None:
        """Log the start and the end of a store fault once each, not once per call."""
        if fault is None and not self._faulty:
            return
        with self._fault_lock:
            if fault is not None and not self._faulty:
                self._faulty = True
                log.error("%s; callers get UNAVAILABLE until it clears", fault)
            elif fault is None and self._faulty:
                self._faulty = False
                log.warning("the store %s is reachable again", self.description)
            else:
                return
            if self._trio_token is not None:
                # (the listener lives in the event loop's thread; this may run in a worker's)
                reason = None if fault is None else str(fault)
                try:
                    self._trio_token.run_sync_soon(self.listener.store_fault, reason)
                except trio.RunFinishedError:
                    pass

    def _tell(self, change: Wakeups) -> None:
        """Wake this hub and, through the notifier, the other sidecars."""
        notify(self.listener, change)
        if self._peers:
            self._outbox.add(change)

    @property
    def _peers(self) -> bool:
        """Whether another sidecar of this hub listens, as far as this one knows: one was
        seen (by the fallback poll, or when this one started listening) or heard from in the
        last PEERS_SEEN_FOR seconds. Alone, a sidecar sends no wake-ups: they cost a
        transaction each and wake nobody. One that starts listening is seen by the others
        within a poll's period (it says so at once when it sees them), and wakes everything
        again once that period is over (see `_watch`), for what they did not send it
        meanwhile."""
        return time.monotonic() < self._peers_until

    def _saw_peers(self, seen: bool) -> None:
        if seen:
            self._peers_until = time.monotonic() + PEERS_SEEN_FOR

    def _track(self, tx: Tx) -> None:
        """Note the leases a transaction took and gave back (see `run`'s renewals)."""
        for kind, key in tx.released:
            self._held[kind].pop(key, None)
        for kind, key, lease, history in tx.taken:
            self._held[kind][key] = _Held(lease, history)

    # -- writes -----------------------------------------------------------------------------

    async def apply(self, commit: Commit) -> Applied:
        """Apply `commit` in one transaction (see `dt_trio._core._commit`)."""
        history_at = {
            guard.key: held.history
            for guard in commit.guards
            if isinstance(guard, Holds)
            and guard.kind is WorkKind.ORCHESTRATION
            and isinstance(guard.key, str)
            and (held := self._held[WorkKind.ORCHESTRATION].get(guard.key)) is not None
            and held.lease == guard.lease
        }
        prepare = _apply.one_call(commit) if self._functions else None
        if prepare is not None:
            slot = _Queued(prepare, commit.now, history_at)
            if any(isinstance(guard, Creatable) for guard in commit.guards):
                # A start, which a client waits for before it starts the next: on its way at
                # once, beside the batches, not behind one (the bench's hello cities are
                # scheduled one after the other).
                applied = await self._lone(slot)
            else:
                applied = await self._written(slot)
            assert slot.tx is not None
            tx = slot.tx
        else:
            done: list[Tx] = []

            def write(conn: psycopg.Connection[Any]) -> Applied:
                tx = Tx(conn, commit.now, self._ttl, history_at, functions=self._functions)
                applied = _apply.apply(tx, commit)
                done[:] = [tx]
                return applied

            started = time.perf_counter()
            applied = await self._hop(write, retry_lost=False)
            self.commit_stats.committed(time.perf_counter() - started, 1)
            tx = done[0]
        self._track(tx)
        self.counts.steps += tx.steps
        if applied.dropped:
            log.info("%d message(s) dropped: their instance or execution is gone", applied.dropped)
        self._tell(wakeups(commit, applied))
        self.listener.committed(commit, applied)
        return applied

    async def _lone(self, slot: _Queued) -> Applied:
        """A commit of one call, alone: on the loop's connection if it is free (see
        `_direct`), else in a worker thread."""
        conn = self._loop_conn.connection
        if conn is not None:
            call = slot.prepare(self._slot_tx(slot, conn))
            try:
                [row] = await self._loop_conn.call(call.query, call.params)
            except Fallback:
                pass
            except Lost as exc:  # it may have committed
                raise self._unavailable(str(exc)) from exc
            else:
                self.counts.statements += 1
                return call.finish(row)
        at_once = functools.partial(self._write_one, slot)
        return await self._hop(at_once, transaction=False, retry_lost=False)

    # -- the writer ---------------------------------------------------------------------------

    async def _written(self, slot: _Queued) -> Applied:
        """Queue a commit of one call for the writers and wait until it is written (or refused).

        Each writer task (see `_write_batches`) takes what queued while it wrote its last
        batch; while the writers do not run (the store's duties are not running), the commit
        is written alone, in a worker thread. Like a transaction's hop, the wait is not
        cancelled: a commit in flight is tracked (its leases, its wake-ups)."""
        if not self._writing:
            alone = functools.partial(self._write_one, slot)
            return await self._hop(alone, transaction=False, retry_lost=False)
        self._queue.append(slot)
        self._queued.unpark()
        with trio.CancelScope(shield=True):
            await slot.done.wait()
        assert slot.outcome is not None
        return slot.outcome.unwrap()

    async def _write_batches(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """WRITERS tasks, each with a connection of the event loop's (see `_direct`), each
        writing in one round trip all that queued while it wrote its last batch. Cancelled,
        what is still queued is written, alone, before they end: no caller is stranded."""

        async def write(conn: LoopConnection) -> None:
            while True:
                while not self._queue:
                    await self._queued.park()
                batch, self._queue = self._queue[:BATCH_LIMIT], self._queue[BATCH_LIMIT:]
                if self._queue:
                    self._queued.unpark()  # the other writer takes the rest meanwhile
                with trio.CancelScope(shield=True):
                    await self._write_batch(batch, conn)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(WRITERS):
                    conn = LoopConnection(functools.partial(self._connect, WRITER_CONNECTION))
                    await nursery.start(conn.keep)
                    nursery.start_soon(write, conn)
                self._writing = True
                task_status.started()
        finally:
            self._writing = False
            left, self._queue = self._queue, []
            if left:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._write_alone, left)
                    _wake(left)

    async def _write_batch(self, batch: list[_Queued], conn: LoopConnection) -> None:
        """Write `batch` on `conn` in one round trip, each commit in a transaction of its own
        (a refused one leaves the others written), the wake-ups waiting for the other sidecars
        first (see `_notify`: no round trip of their own); those the server refused (it then
        changed nothing: a deadlock, a duplicate start, data it cannot hold) are written again
        alone, where the retries and the errors' meanings are. A connection lost once the
        batch was sent leaves the commits it did not answer unknown: UNAVAILABLE. Without the
        connection, the batch is written alone, in a worker thread."""
        started = time.perf_counter()
        notice = self._outbox.take()
        again: list[_Queued] = []
        try:
            pg = conn.connection
            if pg is None:
                raise Fallback
            calls = [slot.prepare(self._slot_tx(slot, pg)) for slot in batch]
            statements = [(call.query, call.params) for call in calls]
            if notice is not None:
                statements.insert(0, _notice(self.schema, notice))
            lost: Lost | None = None
            try:
                answers: list[Answer | None] = list(await conn.exchange(statements))
            except Lost as exc:
                lost, answers = exc, exc.answers
            self.counts.statements += len(statements)
            self.counts.pipelined += len(statements)
            self.counts.pipelines += 1
            if notice is not None:
                answers.pop(0)
                notice = None
            for slot, call, answer in zip(batch, calls, answers, strict=True):
                if answer is None:  # sent, unanswered: it may have committed
                    assert lost is not None
                    slot.outcome = outcome.Error(self._unavailable(str(lost)))
                elif isinstance(answer, psycopg.Error):
                    again.append(slot)
                else:
                    slot.outcome = outcome.capture(call.finish, answer[0])
            if lost is None:
                self._note_health(None)
        except Fallback:
            again = batch
        except Exception as exc:  # a bug: fail this batch's commits, not the next ones
            log.exception("the store's writer failed")
            for slot in batch:
                if slot.outcome is None:
                    slot.outcome = outcome.Error(exc)
            again = []
        if again or notice is not None:
            await trio.to_thread.run_sync(self._write_alone, again, notice, limiter=self._limiter)
        self.commit_stats.committed(time.perf_counter() - started, len(batch))
        _wake(batch)

    def _write_alone(self, batch: list[_Queued], notice: str | None = None) -> None:
        """In a worker thread: each commit of `batch` in a transaction of its own, with the
        retries; then `notice`, if it is still to be sent."""
        for slot in batch:
            alone = functools.partial(self._write_one, slot)
            slot.outcome = outcome.capture(self._call, alone, False, False)
        if notice is not None:

            def send(conn: psycopg.Connection[Any]) -> None:
                conn.execute(*_notice(self.schema, notice))

            try:
                self._call(send, False, True)
            except Exception as exc:
                # The others' fallback poll finds the work; their waiters wait for the next
                # news.
                log.debug("a wake-up for the other sidecars was not sent: %s", exc)

    def _write_one(self, slot: _Queued, conn: psycopg.Connection[Any]) -> Applied:
        tx = self._slot_tx(slot, conn)
        return slot.prepare(tx).run(tx)

    def _slot_tx(self, slot: _Queued, conn: psycopg.Connection[Any]) -> Tx:
        slot.tx = Tx(conn, slot.now, self._ttl, slot.history_at, functions=self._functions)
        return slot.tx

    # -- leases -----------------------------------------------------------------------------

    async def lease_orchestrations(
        self, owner: str, now: datetime, limit: int
    ) -> Leased[OrchestrationWorkItem]:
        """Lease up to `limit` instances with visible messages that nobody holds, earliest
        first: the lease in one statement, then their histories and inboxes."""
        done: list[Tx] = []

        def lease(conn: psycopg.Connection[Any]) -> Leased[OrchestrationWorkItem]:
            tx = Tx(conn, now, self._ttl, {})
            rows, next_at = _lease(tx, _LEASE_INSTANCES, owner, limit)
            leased = Leased(_apply.load_orchestrations(tx, rows, owner))
            leased.next_at = next_at
            done[:] = [tx]
            return leased

        leased = await self._hop(lease, transaction=False, retry_lost=False)
        self._track(done[0])
        return leased

    async def lease_activities(
        self, owner: str, now: datetime, limit: int
    ) -> Leased[ActivityWorkItem]:
        def lease(conn: psycopg.Connection[Any]) -> Leased[ActivityWorkItem]:
            tx = Tx(conn, now, self._ttl, {})
            rows, next_at = _lease(tx, _LEASE_ACTIVITIES, owner, limit)
            leased = Leased(
                ActivityWorkItem(
                    id=r[0],
                    instance_id=r[1],
                    execution_id=r[2],
                    scheduled=event(r[3]),
                    lease=Lease(owner, r[4]),
                    attempt=r[5] + 1,
                )
                for r in rows
            )
            leased.next_at = next_at
            return leased

        leased = await self._hop(lease, transaction=False, retry_lost=False)
        for item in leased:
            self._held[WorkKind.ACTIVITY][item.id] = _Held(item.lease)
        return leased

    async def lease_entities(self, owner: str, now: datetime, limit: int) -> Leased[EntityWorkItem]:
        def lease(conn: psycopg.Connection[Any]) -> Leased[EntityWorkItem]:
            tx = Tx(conn, now, self._ttl, {})
            rows, next_at = _lease(tx, _LEASE_ENTITIES, owner, limit)
            leased: Leased[EntityWorkItem] = Leased()
            leased.next_at = next_at
            if rows:
                # In a statement after the lease: see `_apply._LOAD`.
                loaded = tx.run(
                    f"""
                    SELECT {ENTITY_COLUMNS},
                        ARRAY(SELECT m.id FROM entity_inbox m WHERE m.instance_id = e.instance_id
                            AND m.visible_at <= %(now)s ORDER BY m.id),
                        ARRAY(SELECT m.event FROM entity_inbox m
                            WHERE m.instance_id = e.instance_id AND m.visible_at <= %(now)s
                            ORDER BY m.id)
                    FROM unnest(%(ids)s::text[]) WITH ORDINALITY AS l(id, ord)
                    JOIN entities e ON e.instance_id = l.id ORDER BY l.ord
                    """,
                    {"now": utc(now), "ids": [r[0] for r in rows]},
                ).fetchall()
                for r, entity in zip(rows, loaded, strict=True):
                    leased.append(
                        EntityWorkItem(
                            entity=to_entity(entity),
                            inbox=[
                                InboxMessage(i, event(e))
                                for i, e in zip(entity[6], entity[7], strict=True)
                            ],
                            lease=Lease(owner, r[1]),
                            attempt=r[2] + 1,
                        )
                    )
            return leased

        leased = await self._hop(lease, transaction=False, retry_lost=False)
        for item in leased:
            self._held[WorkKind.ENTITY][item.entity.instance_id] = _Held(item.lease)
        return leased

    async def read_inbox(self, instance_id: str, lease: Lease, now: datetime) -> list[InboxMessage]:
        """The visible inbox of an instance held with `lease` (LockLost if it is not)."""

        def read(conn: psycopg.Connection[Any]) -> list[InboxMessage]:
            rows = (
                conn.cursor(binary=True)
                .execute(
                    "SELECT m.id, m.event FROM instances i LEFT JOIN inbox m "
                    "ON m.instance_id = i.instance_id AND m.visible_at <= %s "
                    "WHERE i.instance_id = %s AND i.lease_owner = %s AND i.lease_epoch = %s "
                    "ORDER BY m.id",
                    (utc(now), instance_id, lease.owner, lease.epoch),
                )
                .fetchall()
            )
            if not rows:
                raise LockLost(f"instance '{instance_id}' is no longer leased by {lease.owner}")
            return [InboxMessage(r[0], event(r[1])) for r in rows if r[0] is not None]

        return await self._hop(read, transaction=False)

    # -- reads ------------------------------------------------------------------------------

    async def _read(self, query: str, params: Sequence[object]) -> list[Any]:
        """The rows of one statement that only reads (each statement its own transaction)."""

        try:
            rows = await self._loop_conn.call(query, params)
        except (Fallback, Lost):
            pass  # (a read may be tried again)
        else:
            self.counts.statements += 1
            return rows

        def read(conn: psycopg.Connection[Any]) -> list[Any]:
            return conn.cursor(binary=True).execute(query, params).fetchall()

        return await self._hop(read, transaction=False)

    async def _read_page(
        self, query: str, params: Sequence[object], page_size: int
    ) -> tuple[list[Any], Any | None]:
        """A page of `query`'s rows (a statement that ends in `LIMIT %s`), at most `page_size`,
        and its last row if another page follows."""
        return split_page(await self._read(query, (*params, page_size + 1)), page_size)

    async def get_instance(self, instance_id: str) -> InstanceState | None:
        rows = await self._read(
            f"SELECT {INSTANCE_COLUMNS} FROM instances WHERE instance_id = %s", (instance_id,)
        )
        return to_state(rows[0]) if rows else None

    async def get_history(self, instance_id: str) -> list[pb.HistoryEvent]:
        def read(conn: psycopg.Connection[Any]) -> list[pb.HistoryEvent]:
            return _history(conn, instance_id)

        return await self._hop(read, transaction=False)

    async def query_instances(
        self,
        where: InstanceFilter,
        page_size: int,
        after: PageKey | None,
        newest_first: bool = False,
    ) -> tuple[list[InstanceState], PageKey | None]:
        cond = _filter_sql(where)
        if after is not None:
            beyond = "<" if newest_first else ">"
            cond.add(f"(created_at, instance_id) {beyond} (%s, %s)", from_us(after[0]), after[1])
        order = "DESC" if newest_first else "ASC"
        rows, last = await self._read_page(
            f"SELECT {INSTANCE_COLUMNS} FROM instances{cond.where()}"
            f" ORDER BY created_at {order}, instance_id {order} LIMIT %s",
            cond.params,
            page_size,
        )
        states = [to_state(r) for r in rows]
        next_key = (us(states[-1].created_at), states[-1].instance_id) if last is not None else None
        return states, next_key

    async def count_instances(self, where: InstanceFilter) -> dict[Status, int]:
        cond = _filter_sql(where)
        rows = await self._read(
            f"SELECT status, count(*) FROM instances{cond.where()} GROUP BY status", cond.params
        )
        return {Status(status): count for status, count in rows}

    async def list_finished_ids(
        self, where: FinishedFilter, page_size: int, after: PageKey | None
    ) -> tuple[list[str], PageKey | None]:
        allowed = [int(s) for s in where.terminal_statuses]
        if not allowed:
            return [], None
        cond = Conditions("%s", utc)
        cond.add("completed_at IS NOT NULL")
        cond.add("status = ANY(%s::smallint[])", allowed)
        cond.between("completed_at", where.completed_from, where.completed_to)
        if after is not None:
            cond.add("(completed_at, instance_id) > (%s, %s)", from_us(after[0]), after[1])
        rows, last = await self._read_page(
            f"SELECT completed_at, instance_id FROM instances{cond.where()}"
            " ORDER BY completed_at, instance_id LIMIT %s",
            cond.params,
            page_size,
        )
        return [r[1] for r in rows], (us(last[0]), last[1]) if last is not None else None

    async def get_entity(self, entity_id: str) -> EntityState | None:
        rows = await self._read(
            f"SELECT {ENTITY_COLUMNS} FROM entities e WHERE e.instance_id = %s", (entity_id,)
        )
        return to_entity(rows[0]) if rows else None

    async def query_entities(
        self, where: EntityFilter, page_size: int, after: str | None
    ) -> tuple[list[EntityState], str | None]:
        cond = Conditions("%s", utc)
        cond.add("e.instance_id > %s", after or "")
        if where.id_prefix:
            cond.add("starts_with(e.instance_id, %s)", where.id_prefix)
        cond.between("e.last_modified_at", where.modified_from, where.modified_to)
        if not where.include_transient:
            cond.add("e.state IS NOT NULL")
        rows, last = await self._read_page(
            f"SELECT {ENTITY_COLUMNS} FROM entities e{cond.where()}"
            " ORDER BY e.instance_id LIMIT %s",
            cond.params,
            page_size,
        )
        return [to_entity(r) for r in rows], last[0] if last is not None else None

    # -- administration ---------------------------------------------------------------------

    async def purge(self, instance_id: str, recursive: bool) -> int:
        def write(conn: psycopg.Connection[Any]) -> list[str]:
            tx = Tx(conn, datetime.now(UTC), self._ttl, {})
            ids = [instance_id]
            if recursive:
                ids = [
                    r[0]
                    for r in tx.run(
                        """
                        WITH RECURSIVE tree(id) AS (
                            SELECT %s::text COLLATE "C"
                            UNION SELECT i.instance_id FROM instances i
                                  JOIN tree ON i.parent_instance_id = tree.id
                        )
                        SELECT id FROM tree
                        """,
                        (instance_id,),
                    ).fetchall()
                ]
            finished = [
                r[0]
                for r in tx.run(
                    "SELECT instance_id FROM instances WHERE instance_id = ANY(%s::text[]) "
                    "AND status = ANY(%s::smallint[]) FOR UPDATE",
                    (ids, TERMINAL),
                ).fetchall()
            ]
            _apply.delete_instances(tx, finished)
            return finished

        purged = await self._hop(write)
        self._tell(wakeups_of(frozenset(), (instance_id, *purged)))
        return len(purged)

    async def purge_where(
        self, where: InstanceFilter, recursive: bool, batch: int, deadline: float | None
    ) -> tuple[int, bool]:
        finished = frozenset(s for s in (where.statuses or Status) if s.is_terminal)
        if not finished:
            return 0, True
        cond = _filter_sql(dataclasses.replace(where, statuses=finished))
        select = f"SELECT instance_id FROM instances{cond.where()} LIMIT %s FOR UPDATE SKIP LOCKED"
        total = 0
        while True:

            def write(conn: psycopg.Connection[Any]) -> list[str]:
                tx = Tx(conn, datetime.now(UTC), self._ttl, {})
                ids = [r[0] for r in tx.run(select, (*cond.params, batch)).fetchall()]
                if recursive:
                    ids = _with_finished_descendants(tx, ids)
                _apply.delete_instances(tx, ids)
                return ids

            ids = await self._hop(write)
            total += len(ids)
            if ids:
                self._tell(wakeups_of(frozenset(), tuple(ids)))
            if not ids:
                return total, True
            if deadline is not None and time.monotonic() > deadline:
                return total, False

    async def try_write(self) -> None:
        def rewrite(conn: psycopg.Connection[Any]) -> None:
            # the schema version, written as it is: a write that changes nothing
            conn.execute("UPDATE schema_version SET version = version")

        await self._hop(rewrite)

    async def delete_everything(self) -> None:
        def write(conn: psycopg.Connection[Any]) -> None:
            for table in (
                "history",
                "inbox",
                "activities",
                "instances",
                "entity_inbox",
                "entities",
            ):
                conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))

        await self._hop(write)
        for leases in self._held.values():
            leases.clear()
        self.listener.any_instance_changed()
        if self._peers:
            self._outbox.add_everything()

    async def clean_entity_storage(
        self, remove_empty: bool, release_orphaned_locks: bool
    ) -> tuple[int, int]:
        def write(conn: psycopg.Connection[Any]) -> tuple[int, int]:
            released = 0
            if release_orphaned_locks:
                history = functools.partial(_history, conn)
                orphans = [
                    entity_id
                    for entity_id, section, owner, status in conn.execute(
                        "SELECT e.instance_id, e.locked_by, e.lock_owner, i.status FROM entities e "
                        "LEFT JOIN instances i ON i.instance_id = e.lock_owner "
                        "WHERE e.locked_by IS NOT NULL AND e.lease_owner IS NULL "
                        "FOR UPDATE OF e SKIP LOCKED"
                    ).fetchall()
                    if lock_is_orphaned(entity_id, section, owner, status, history)
                ]
                if orphans:
                    # What waited for the lock may run now.
                    conn.execute(
                        "UPDATE entity_inbox SET deferred = false "
                        "WHERE instance_id = ANY(%s::text[])",
                        (orphans,),
                    )
                    conn.execute(
                        "UPDATE entities SET locked_by = NULL, lock_owner = NULL, ready_at = "
                        "(SELECT min(visible_at) FROM entity_inbox m "
                        "WHERE m.instance_id = entities.instance_id) "
                        "WHERE instance_id = ANY(%s::text[])",
                        (orphans,),
                    )
                released = len(orphans)
            removed = 0
            if remove_empty:
                removed = conn.execute(
                    "DELETE FROM entities e WHERE state IS NULL AND locked_by IS NULL "
                    "AND lease_owner IS NULL AND NOT EXISTS "
                    "(SELECT 1 FROM entity_inbox m WHERE m.instance_id = e.instance_id)"
                ).rowcount
            return removed, released

        removed, released = await self._hop(write)
        if released:
            self._tell(Wakeups(entities=True))
        return removed, released

    # -- the store's own duties -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew this process's leases, send and receive wake-ups, poll as a fallback, until
        cancelled (see the module's docstring); what is left to send is sent on the way out."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._write_batches)
            await nursery.start(self._listen)
            await nursery.start(self._loop_conn.keep)
            nursery.start_soon(self._notify)
            nursery.start_soon(self._renew)
            nursery.start_soon(self._poll)
            task_status.started()

    async def _notify(self) -> None:
        try:
            while True:
                await self._outbox.wait()
                await self._send_notice()
                await trio.sleep(NOTIFY_INTERVAL)
        finally:
            if self._outbox:
                with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                    await self._send_notice()

    async def _send_notice(self) -> None:
        payload = self._outbox.take()
        if payload is None:
            return

        def send(conn: psycopg.Connection[Any]) -> None:
            conn.execute(*_notice(self.schema, payload))

        try:
            await self._hop(send, transaction=False, limiter=self._notify_limiter)
        except StoreUnavailable as exc:
            # The others' fallback poll finds the work; their waiters wait for the next news.
            log.debug("a wake-up for the other sidecars was not sent: %s", exc)

    async def _listen(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Receive the other sidecars' wake-ups. After the LISTEN connection is made again,
        wake everything: what was sent meanwhile is lost."""
        started = False
        delay = 0.05
        while True:
            try:
                conn, peers = await trio.to_thread.run_sync(self._listening_connection)
            except (psycopg.Error, OSError) as exc:
                if not started:
                    log.warning("cannot listen for other sidecars' wake-ups yet: %s", exc)
                    task_status.started()
                    started = True
                await trio.sleep(delay)
                delay = min(delay * 2, RELISTEN_SECONDS)
                continue
            delay = 0.05
            fd = conn.pgconn.socket
            try:
                if not started:
                    task_status.started()
                    started = True
                else:
                    log.info("listening for other sidecars' wake-ups again")
                self._wake_everything()
                self._saw_peers(peers)
                if peers:  # say so at once: they send this one wake-ups from now on
                    self._outbox.greet()
                await self._watch(conn, fd)
            except psycopg.Error as exc:
                log.warning("lost the connection that listens for wake-ups: %s", exc)
            finally:
                trio.lowlevel.notify_closing(fd)
                conn.close()

    def _listening_connection(self) -> tuple[psycopg.Connection[Any], bool]:
        """A connection that listens, and whether another sidecar already does."""
        conn = self._connect(self._listener_name)
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.schema)))
            self._listener_pid = conn.info.backend_pid
            row = conn.execute(*_peers_sql(self._peers_query())).fetchone()
        except BaseException:
            conn.close()
            raise
        return conn, bool(row and row[0])

    def _peers_query(self) -> dict[str, object]:
        return {"listener": self._listener_name, "pid": self._listener_pid}

    async def _watch(self, conn: psycopg.Connection[Any], fd: int) -> None:
        """Pass on what the other sidecars send; LISTEN_SETTLES seconds in, wake everything
        once more (see `_peers`)."""
        pgconn = conn.pgconn
        settled = trio.current_time() + LISTEN_SETTLES
        while True:
            with trio.move_on_at(settled) as waiting:
                await trio.lowlevel.wait_readable(fd)
            if waiting.cancelled_caught:
                settled = math.inf
                self._wake_everything()
                continue
            pgconn.consume_input()  # raises once the connection is gone
            while (notify := pgconn.notifies()) is not None:
                notice = Notice.decode(notify.extra.decode())
                if notice is not None and notice.sender != self._id:
                    self._saw_peers(True)
                    self._heard(notice)
            if pgconn.status != psycopg.pq.ConnStatus.OK:
                raise psycopg.OperationalError("the connection is closed")

    def _heard(self, notice: Notice) -> None:
        if WorkKind.ORCHESTRATION in notice.kinds:
            self.listener.orchestration_work_added()
        if WorkKind.ACTIVITY in notice.kinds:
            self.listener.activity_work_added()
        if WorkKind.ENTITY in notice.kinds:
            self.listener.entity_work_added()
        if notice.instances is None:
            self.listener.any_instance_changed()
        else:
            for instance_id in notice.instances:
                self.listener.instance_changed(instance_id)

    def _wake_everything(self) -> None:
        self._heard(Notice("", frozenset(WorkKind), None))

    async def _renew(self) -> None:
        """Renew the leases this process holds, every third of their time to live."""
        while True:
            await trio.sleep(self.lease_ttl / 3)
            held = {k: {key: h.lease for key, h in v.items()} for k, v in self._held.items() if v}
            if not held:
                continue
            try:
                kept = await self._hop(functools.partial(_renew, ttl=self._ttl, held=held))
            except StoreUnavailable:
                continue  # logged; the next round tries again
            for kind, leases in held.items():
                for key, lease in leases.items():
                    if key in kept[kind]:
                        continue
                    now_held = self._held[kind].get(key)
                    if now_held is not None and now_held.lease == lease:
                        # (its lease expired and was taken back, or its work is gone: the
                        # instance ended or was purged; either way its commit will be refused)
                        log.info(
                            "%s is no longer leased to this process", _apply._describe(kind, key)
                        )
                        del self._held[kind][key]

    async def _poll(self) -> None:
        """The fallback: about once a second, clear expired leases and wake the processors
        that have visible work nobody holds (their wake-ups may have been lost)."""
        while True:
            await trio.sleep(POLL_SECONDS * random.uniform(0.75, 1.25))
            now = datetime.now(UTC)
            try:
                found, expired, peers = await self._hop(
                    functools.partial(_poll, now=now, peers=self._peers_query()),
                    transaction=False,
                )
            except StoreUnavailable:
                continue
            notify(self.listener, wakeups_of(found))
            self._saw_peers(peers)
            if expired:
                log.info("took back expired leases: %s", ", ".join(k.value for k in expired))
                self._tell(wakeups_of(expired))


@dataclasses.dataclass(frozen=True)
class _LeaseOf:
    """How one kind of work is leased: its table (aliased `t`), key, readiness column and
    order, and what a lease returns (its last column is the sort key)."""

    table: str
    key: str
    ready: str
    order: str
    returning: str


_LEASE_INSTANCES = _LeaseOf(
    "instances", "instance_id", "ready_at", "ready_at", f"{LEASED_INSTANCE}, i.ready_at"
)
_LEASE_ACTIVITIES = _LeaseOf(
    "activities",
    "id",
    "visible_at",
    "visible_at, id",
    "i.id, i.instance_id, i.execution_id, i.event, i.lease_epoch, i.attempts, (i.visible_at, i.id)",
)
_LEASE_ENTITIES = _LeaseOf(
    "entities",
    "instance_id",
    "ready_at",
    "ready_at",
    "i.instance_id, i.lease_epoch, i.attempts, i.ready_at",
)


def _lease(
    tx: Tx, of: _LeaseOf, owner: str, limit: int
) -> tuple[list[tuple[Any, ...]], datetime | None]:
    """Lease up to `limit` rows of visible work nobody holds (SKIP LOCKED: rows another
    transaction is leasing are someone else's), in one statement, which also says when the
    next row nobody holds becomes visible. Returns the leased rows in order, and that time."""
    rows = tx.run(
        f"""
        WITH picked AS (
            SELECT {of.key} FROM {of.table}
            WHERE lease_owner IS NULL AND {of.ready} <= %(now)s
            ORDER BY {of.order} LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ), leased AS (
            UPDATE {of.table} i SET lease_owner = %(owner)s, lease_epoch = nextval('lease_epochs'),
                lease_until = now() + %(ttl)s
            FROM picked WHERE i.{of.key} = picked.{of.key}
            RETURNING {of.returning}
        )
        SELECT leased.*, later.at FROM (
            SELECT min({of.ready}) AS at FROM {of.table}
            WHERE lease_owner IS NULL AND {of.ready} > %(now)s
        ) later LEFT JOIN leased ON true
        """,
        {"now": utc(tx.now), "limit": limit, "owner": owner, "ttl": tx.ttl},
    ).fetchall()
    next_at = rows[0][-1] if rows else None
    leased = sorted((r[:-1] for r in rows if r[0] is not None), key=lambda r: r[-1])
    return leased, next_at if len(leased) < limit else None


def _notice(schema: str, payload: str) -> tuple[str, tuple[str, str]]:
    """The statement that sends the other sidecars `payload` (see `_notify`)."""
    return "SELECT pg_notify(%s, %s)", (schema, payload)


def _wake(batch: list[_Queued]) -> None:
    """Wake the callers of a batch the writers wrote."""
    for slot in batch:
        slot.done.set()


# Errors after which a transaction is tried again.
_RETRIED = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)

_SESSION_ENDED = (
    psycopg.errors.AdminShutdown,
    psycopg.errors.CrashShutdown,
    psycopg.errors.CannotConnectNow,
)


def _history(conn: psycopg.Connection[Any], instance_id: str) -> list[pb.HistoryEvent]:
    return [
        event(r[0])
        for r in conn.cursor(binary=True)
        .execute("SELECT event FROM history WHERE instance_id = %s ORDER BY seq", (instance_id,))
        .fetchall()
    ]


_KEY_TYPE = {WorkKind.ORCHESTRATION: "text", WorkKind.ACTIVITY: "bigint", WorkKind.ENTITY: "text"}


def _renew(
    conn: psycopg.Connection[Any], ttl: timedelta, held: dict[WorkKind, dict[str | int, Lease]]
) -> dict[WorkKind, set[str | int]]:
    """Renew the leases `held`, one statement per kind; returns the keys still held."""
    kept: dict[WorkKind, set[str | int]] = {k: set() for k in WorkKind}
    for kind, leases in held.items():
        table, key = _apply.LEASED_TABLE[kind]
        rows = conn.execute(
            f"UPDATE {table} t SET lease_until = now() + %s "
            f"FROM unnest(%s::{_KEY_TYPE[kind]}[], %s::text[], %s::bigint[]) "
            "AS l(key, owner, epoch) "
            f"WHERE t.{key} = l.key AND t.lease_owner = l.owner AND t.lease_epoch = l.epoch "
            f"RETURNING t.{key}",
            (
                ttl,
                list(leases),
                [lease.owner for lease in leases.values()],
                [lease.epoch for lease in leases.values()],
            ),
        ).fetchall()
        kept[kind] = {r[0] for r in rows}
    return kept


def _give_back(conn: psycopg.Connection[Any], held: dict[WorkKind, dict[str | int, Lease]]) -> None:
    """Release leases, as they are (attempts kept), one statement per kind."""
    for kind, leases in held.items():
        table, key = _apply.LEASED_TABLE[kind]
        conn.execute(
            f"UPDATE {table} t SET lease_owner = NULL, lease_until = NULL "
            f"FROM unnest(%s::{_KEY_TYPE[kind]}[], %s::text[], %s::bigint[]) "
            "AS l(key, owner, epoch) "
            f"WHERE t.{key} = l.key AND t.lease_owner = l.owner AND t.lease_epoch = l.epoch",
            (
                list(leases),
                [lease.owner for lease in leases.values()],
                [lease.epoch for lease in leases.values()],
            ),
        )


def _peers_sql(params: dict[str, object]) -> tuple[str, dict[str, object]]:
    """Whether another sidecar of the hub listens (its LISTEN connection's application name;
    `params`' pid is this sidecar's): a statement and its parameters."""
    return f"SELECT {_PEERS}", params


_PEERS = """EXISTS (SELECT FROM pg_stat_get_activity(NULL) a
                WHERE a.application_name = %(listener)s AND a.pid <> %(pid)s
                AND a.datid = (SELECT oid FROM pg_database WHERE datname = current_database()))"""


def _poll(
    conn: psycopg.Connection[Any], now: datetime, peers: dict[str, object]
) -> tuple[frozenset[WorkKind], frozenset[WorkKind], bool]:
    """One statement: clear expired leases, say which kinds have visible work that nobody
    holds (and which had expired leases), and whether another sidecar listens."""
    row = conn.execute(
        """
        WITH xi AS (UPDATE instances SET lease_owner = NULL, lease_until = NULL
                    WHERE lease_owner IS NOT NULL AND lease_until < now() RETURNING 1),
             xa AS (UPDATE activities SET lease_owner = NULL, lease_until = NULL
                    WHERE lease_owner IS NOT NULL AND lease_until < now() RETURNING 1),
             xe AS (UPDATE entities SET lease_owner = NULL, lease_until = NULL
                    WHERE lease_owner IS NOT NULL AND lease_until < now() RETURNING 1)
        SELECT
            EXISTS (SELECT 1 FROM instances WHERE lease_owner IS NULL AND ready_at <= %(now)s),
            EXISTS (SELECT 1 FROM activities WHERE lease_owner IS NULL AND visible_at <= %(now)s),
            EXISTS (SELECT 1 FROM entities WHERE lease_owner IS NULL AND ready_at <= %(now)s),
            EXISTS (SELECT 1 FROM xi), EXISTS (SELECT 1 FROM xa), EXISTS (SELECT 1 FROM xe),
        """
        + _PEERS,
        {"now": now, **peers},
    ).fetchone()
    assert row is not None
    kinds = list(WorkKind)
    found = frozenset(
        k
        for k, visible, expired in zip(kinds, row[:3], row[3:6], strict=True)
        if visible or expired
    )
    expired = frozenset(k for k, gone in zip(kinds, row[3:6], strict=True) if gone)
    return found, expired, bool(row[6])


def _filter_sql(where: InstanceFilter) -> Conditions:
    cond = Conditions("%s", utc)
    if where.statuses is not None:
        cond.add("status = ANY(%s::smallint[])", [int(s) for s in where.statuses])
    cond.between("created_at", where.created_from, where.created_to)
    if where.id_prefix:
        cond.add("starts_with(instance_id, %s)", where.id_prefix)
    if where.name is not None:
        cond.add("name = %s", where.name)
    return cond


def _with_finished_descendants(tx: Tx, ids: Sequence[str]) -> list[str]:
    """`ids` and their sub-orchestrations, at any depth, that are finished."""
    if not ids:
        return []
    rows = tx.run(
        """
        WITH RECURSIVE tree(id) AS (
            SELECT unnest(%s::text[]) COLLATE "C"
            UNION SELECT i.instance_id FROM instances i JOIN tree ON i.parent_instance_id = tree.id
            WHERE i.status = ANY(%s::smallint[])
        )
        SELECT id FROM tree
        """,
        (list(ids), TERMINAL),
    ).fetchall()
    return list(dict.fromkeys([*ids, *(r[0] for r in rows)]))
