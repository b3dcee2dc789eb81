"""Statements from the event loop's thread: no worker thread's hop.

A worker thread costs two hand-overs per transaction besides its round trip, to the thread
and back, each a wait for the GIL and a CPU on a busy machine. The store's hot statements (a
start and a read a client waits for, the writers' batches of commits) go instead on
connections in libpq's non-blocking pipeline mode, driven by trio (`wait_readable` and
`wait_writable` on the socket, as the LISTEN connection is watched): parameters dumped and
rows loaded by psycopg's `Transformer`, each statement sent with the extended protocol,
binary both ways, prepared on the connection the first time it is sent with its parameters'
types (as psycopg prepares what it sends often: no parse or plan after that), and followed
by a Sync of its own, so that each is a transaction of its own
(a failed one changes nothing and stops nothing after it) while a batch of them takes one
round trip.

A connection runs one exchange at a time. While it is busy, or missing (being made, lost), or
when nothing could be sent, `exchange` raises `Fallback` and the caller takes a worker
thread. A statement the server refused comes back as its error, having changed nothing. A
connection lost after statements were sent leaves theirs unknown: `Lost`, with the answers
that did arrive.
"""

from __future__ import annotations

import functools
import re
import select
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import trio
from psycopg import abc, pq
from psycopg.adapt import PyFormat, Transformer

from dt_trio._log import get_logger

log = get_logger(__name__)

# While a connection cannot be made, try again this often.
RECONNECT_SECONDS = 1.0
# Statements prepared on a connection, at most (each kept for the connection's life; one
# whose execution failed is prepared again, in case what it was planned on changed).
MAX_PREPARED = 256

# A statement's answer: its rows, or the error it was refused with (it changed nothing).
Answer = list[tuple[Any, ...]] | psycopg.Error


class Fallback(Exception):
    """Nothing was sent: run the statements in a worker thread."""


@dataclass
class Lost(Exception):
    """The connection was lost once statements were sent: `answers`, in their order, has
    those that arrived (each with its Sync, so each is known) and None for the others, which
    may or may not have committed."""

    answers: list[Answer | None]
    cause: Exception

    def __str__(self) -> str:
        return str(self.cause).strip()


@functools.lru_cache(maxsize=64)
def numbered(query: str) -> bytes:
    """`query` with psycopg's `%s` placeholders as libpq's `$1`, `$2`, ..."""
    count = 0

    def number(_: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return f"${count}"

    return re.sub(r"%s", number, query).encode()


class LoopConnection:
    """One connection used from the event loop's thread (see the module's docstring); `keep`
    (a duty of the store's `run`) makes it and makes it again."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self._conn: psycopg.Connection[Any] | None = None
        self._transformer: abc.Transformer | None = None
        self._busy = False
        self._lost = trio.Event()
        # The connection's prepared statements: by query and parameter types, their names;
        # how many were prepared.
        self._prepared: dict[tuple[str, tuple[int, ...]], bytes] = {}
        self._preparations = 0

    async def keep(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection until cancelled: made in a worker thread, made again once lost.
        Started once the first attempt is over, whatever came of it."""
        starting = True
        while True:
            try:
                conn = await trio.to_thread.run_sync(self._connect)
            except (psycopg.Error, OSError) as exc:
                log.debug("no connection for the event loop's statements yet: %s", exc)
                if starting:
                    starting = False
                    task_status.started()
                await trio.sleep(RECONNECT_SECONDS)
                continue
            conn.pgconn.nonblocking = 1
            self._conn, self._transformer = conn, Transformer(conn)
            self._prepared, self._preparations = {}, 0
            self._lost = trio.Event()
            if starting:
                starting = False
                task_status.started()
            try:
                await self._lost.wait()
            finally:
                self._conn = self._transformer = None
                if not self._busy:  # (an exchange under way closes it when it is done)
                    _close(conn)

    @property
    def connection(self) -> psycopg.Connection[Any] | None:
        """The connection, while there is one."""
        return self._conn

    def lose(self) -> None:
        """Close the connection (the store is closing)."""
        self._lost.set()

    async def call(self, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The rows of one statement (with `%s` placeholders) run with `params`. Raises
        Fallback also when the statement was refused (it changed nothing: the worker thread's
        way has the retries and the errors' meanings), and Lost."""
        [answer] = await self.exchange([(query, params)])
        if isinstance(answer, psycopg.Error):
            raise Fallback from answer
        return answer

    async def exchange(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[Answer]:
        """Each of `statements` in a transaction of its own, in one round trip: their answers
        in order. A statement whose parameters psycopg cannot send (a NUL in a text) is not
        sent: its error is its answer. Raises Fallback or Lost (see the module's docstring)."""
        conn, transformer = self._conn, self._transformer
        if conn is None or transformer is None or self._busy:
            raise Fallback
        pgconn = conn.pgconn
        if closed(pgconn):
            self._lost.set()
            raise Fallback
        answers: list[Answer | None] = []
        # the statements sent, by index, with what they prepare (its key and name) if anything
        sending: list[tuple[int, tuple[str, tuple[int, ...]], bytes | None]] = []
        pending: dict[tuple[str, tuple[int, ...]], bytes] = {}  # prepared by this exchange
        self._busy = True
        sent = False
        try:
            with trio.CancelScope(shield=True):  # an exchange half-way leaves nothing usable
                pgconn.enter_pipeline_mode()
                for query, params in statements:
                    try:
                        values = transformer.dump_sequence(params, [PyFormat.AUTO] * len(params))
                    except psycopg.Error as exc:
                        answers.append(exc)
                        continue
                    key = (query, tuple(transformer.types or ()))
                    name = self._prepared.get(key) or pending.get(key)
                    preparing = None
                    if name is None and self._preparations < MAX_PREPARED:
                        name = b"dt_trio_%d" % self._preparations
                        self._preparations += 1
                        pgconn.send_prepare(name, numbered(query), param_types=key[1])
                        preparing = pending[key] = name
                    if name is None:
                        pgconn.send_query_params(
                            numbered(query),
                            values,
                            param_types=key[1],
                            param_formats=transformer.formats,
                            result_format=pq.Format.BINARY,
                        )
                    else:
                        pgconn.send_query_prepared(
                            name,
                            values,
                            param_formats=transformer.formats,
                            result_format=pq.Format.BINARY,
                        )
                    pgconn.pipeline_sync()
                    sending.append((len(answers), key, preparing))
                    answers.append(None)
                if sending:
                    sent = True
                    await _flush(pgconn)
                for index, key, preparing in sending:
                    if preparing is not None:
                        prepared = await _answer(pgconn, transformer, conn.info.encoding, False)
                        if not isinstance(prepared, psycopg.Error):
                            self._prepared[key] = preparing
                    answer = answers[index] = await _answer(pgconn, transformer, conn.info.encoding)
                    if isinstance(answer, psycopg.Error):
                        self._prepared.pop(key, None)
                pgconn.exit_pipeline_mode()
        except (psycopg.OperationalError, OSError) as exc:
            self._lost.set()
            if not sent:
                raise Fallback from exc
            raise Lost(answers, exc) from exc
        finally:
            self._busy = False
            if self._conn is not conn:  # lost meanwhile (see keep)
                _close(conn)
        if pgconn.status != pq.ConnStatus.OK:  # the server ended the session
            self._lost.set()
        return [a for a in answers if a is not None]


async def _answer(
    pgconn: pq.abc.PGconn, transformer: abc.Transformer, encoding: str, synced: bool = True
) -> Answer:
    """The next statement's answer, once its Sync's has come too (`synced`; a statement's
    preparation has none of its own)."""
    result = await _next(pgconn)
    if result is None:
        raise psycopg.OperationalError("no answer to a statement")
    while await _next(pgconn) is not None:  # the end of its results
        pass
    if synced:
        sync = await _next(pgconn)
        if sync is None or sync.status != pq.ExecStatus.PIPELINE_SYNC:
            raise psycopg.OperationalError("a statement's answer came without its Sync")
    if result.status == pq.ExecStatus.PIPELINE_ABORTED:  # its preparation failed
        return psycopg.OperationalError("the statement could not be prepared")
    if result.status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
        transformer.set_pgresult(result)
        return transformer.load_rows(0, result.ntuples, tuple)
    if result.status == pq.ExecStatus.FATAL_ERROR:
        return psycopg.errors.error_from_result(result, encoding=encoding)
    raise psycopg.OperationalError(f"unexpected answer {pq.ExecStatus(result.status).name}")


async def _next(pgconn: pq.abc.PGconn) -> pq.abc.PGresult | None:
    """The connection's next result (None: the end of a statement's), waiting for it."""
    fd = pgconn.socket
    while pgconn.is_busy():
        await trio.lowlevel.wait_readable(fd)
        pgconn.consume_input()
    return pgconn.get_result()


async def _flush(pgconn: pq.abc.PGconn) -> None:
    """Send what libpq holds. While the socket takes no more, take in what the server
    answers meanwhile (it would otherwise stop reading once its own answers filled the
    socket, and neither side would go on)."""
    fd = pgconn.socket
    while pgconn.flush():
        async with trio.open_nursery() as nursery:

            async def readable() -> None:
                await trio.lowlevel.wait_readable(fd)
                pgconn.consume_input()
                nursery.cancel_scope.cancel()

            async def writable() -> None:
                await trio.lowlevel.wait_writable(fd)
                nursery.cancel_scope.cancel()

            nursery.start_soon(readable)
            nursery.start_soon(writable)


def closed(pgconn: pq.abc.PGconn) -> bool:
    """Whether the server has closed an idle connection: one that has anything to read (the
    server's goodbye after a restart or a terminated backend, the end of the stream), which an
    idle connection otherwise never has, is taken as closed. A poll of its socket, no round
    trip."""
    if pgconn.status != pq.ConnStatus.OK or pgconn.transaction_status != pq.TransactionStatus.IDLE:
        return True
    try:
        readable, _, _ = select.select([pgconn.socket], [], [], 0)
    except (psycopg.OperationalError, OSError, ValueError):
        return True
    return bool(readable)


def _close(conn: psycopg.Connection[Any]) -> None:
    try:
        trio.lowlevel.notify_closing(conn.pgconn.socket)
    except (psycopg.Error, OSError, ValueError):
        pass  # (no socket any more)
    try:
        conn.close()
    except psycopg.Error:
        pass
