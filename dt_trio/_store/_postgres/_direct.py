"""Lone statements from the event loop's thread: no worker thread's hop.

A client that waits for one statement (a start, a read of an instance) would otherwise wait
for two hand-overs between threads besides the round trip: to a worker thread and back, each
a wait for the GIL and a CPU on a busy machine. The store keeps one connection for them, in
libpq's non-blocking mode, driven by trio (`wait_writable`/`wait_readable` on its socket, as
the LISTEN connection is): parameters dumped and rows loaded by psycopg's `Transformer`, the
statement sent with the extended protocol, binary both ways, as a binary cursor would.

One statement at a time: while one is on its way, or while the connection is missing (being
made, lost), `call` raises `Fallback` and the caller takes a worker thread. So does a statement
the server refused: it ran in a transaction of its own, rolled back, and the worker thread's
way has the retries and the errors' meanings. A connection lost after the statement was sent
leaves its outcome unknown: `psycopg.OperationalError`, for the caller to report.
"""

from __future__ import annotations

import functools
import re
import select
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import trio
from psycopg import abc, pq
from psycopg.adapt import PyFormat, Transformer

from dt_trio._log import get_logger

log = get_logger(__name__)

# While a connection cannot be made, try again this often.
RECONNECT_SECONDS = 1.0


class Fallback(Exception):
    """The statement did not run, or ran and changed nothing: run it in a worker thread."""


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
    """One connection for lone statements, used from the event loop's thread (see the
    module's docstring); `keep` (a duty of the store's `run`) makes it and makes it again."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self._conn: psycopg.Connection[Any] | None = None
        self._transformer: abc.Transformer | None = None
        self._busy = False
        self._lost = trio.Event()

    async def keep(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection until cancelled: made in a worker thread, made again once lost."""
        task_status.started()
        while True:
            try:
                conn = await trio.to_thread.run_sync(self._connect)
            except (psycopg.Error, OSError) as exc:
                log.debug("no connection for lone statements yet: %s", exc)
                await trio.sleep(RECONNECT_SECONDS)
                continue
            conn.pgconn.nonblocking = 1
            self._conn, self._transformer = conn, Transformer(conn)
            self._lost = trio.Event()
            try:
                await self._lost.wait()
            finally:
                self._conn = self._transformer = None
                if not self._busy:  # (a statement on its way closes it when it is done)
                    _close(conn)

    @property
    def connection(self) -> psycopg.Connection[Any] | None:
        """The connection, while there is one."""
        return self._conn

    async def call(self, query: str, params: Sequence[Any]) -> list[Sequence[Any]]:
        """The rows of `query` (with `%s` placeholders) run with `params`, in a transaction of
        its own. Raises Fallback (see the module's docstring), or psycopg.OperationalError
        when the connection was lost once the statement was sent."""
        conn, transformer = self._conn, self._transformer
        if conn is None or transformer is None or self._busy:
            raise Fallback
        pgconn = conn.pgconn
        if closed(pgconn):
            self._lost.set()
            raise Fallback
        self._busy = True
        sent = False
        try:
            with trio.CancelScope(shield=True):  # a statement half-way leaves nothing usable
                values = transformer.dump_sequence(params, [PyFormat.AUTO] * len(params))
                pgconn.send_query_params(
                    numbered(query),
                    values,
                    param_types=transformer.types,
                    param_formats=transformer.formats,
                    result_format=pq.Format.BINARY,
                )
                sent = True
                fd = pgconn.socket
                while pgconn.flush():
                    await trio.lowlevel.wait_writable(fd)
                results = []
                while True:
                    while pgconn.is_busy():
                        await trio.lowlevel.wait_readable(fd)
                        pgconn.consume_input()
                    result = pgconn.get_result()
                    if result is None:
                        break
                    results.append(result)
        except (psycopg.OperationalError, OSError) as exc:
            self._lost.set()
            if not sent:
                raise Fallback from exc
            if isinstance(exc, psycopg.OperationalError):
                raise
            raise psycopg.OperationalError(str(exc)) from exc
        except psycopg.Error as exc:  # a parameter psycopg cannot send (a NUL in a text)
            if not sent:
                raise Fallback from exc
            raise
        finally:
            self._busy = False
            if self._conn is not conn:  # lost meanwhile (see keep)
                _close(conn)
        if pgconn.status != pq.ConnStatus.OK:  # the server ended the session
            self._lost.set()
        [result] = results
        if result.status != pq.ExecStatus.TUPLES_OK:
            raise Fallback
        transformer.set_pgresult(result)
        return transformer.load_rows(0, result.ntuples, tuple)

    def lose(self) -> None:
        """Close the connection (the store is closing, or a test kills it)."""
        self._lost.set()


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
