"""Statements from the event loop's thread (dt_trio/_store/_postgres/_direct.py), against a
real PostgreSQL: each its own transaction in one round trip, prepared once per connection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import trio
import trio.testing

from dt_trio._store._postgres._direct import Fallback, LoopConnection

pytestmark = pytest.mark.postgres_only


@pytest.fixture
async def loop_conn(pg_address: str) -> AsyncIterator[LoopConnection]:
    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(pg_address, autocommit=True)

    conn = LoopConnection(connect)
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.keep)
        yield conn
        nursery.cancel_scope.cancel()


async def prepared(conn: LoopConnection, query: str) -> int:
    """How many statements prepared on `conn` are `query`."""
    rows = await conn.call("SELECT statement FROM pg_prepared_statements", ())
    return sum(1 for (statement,) in rows if statement == query)


async def test_each_statement_is_its_own_transaction_and_a_refused_one_stops_nothing(
    loop_conn: LoopConnection, pg_address: str
) -> None:
    await loop_conn.call("CREATE TEMP TABLE t (n int PRIMARY KEY)", ())
    answers = await loop_conn.exchange(
        [
            ("INSERT INTO t VALUES (%s) RETURNING n", (1,)),
            ("INSERT INTO t VALUES (%s) RETURNING n", (1,)),  # refused: a duplicate key
            ("INSERT INTO t VALUES (%s) RETURNING n", ("not a number \x00",)),  # never sent
            ("INSERT INTO t VALUES (%s) RETURNING n", (2,)),
        ]
    )
    assert answers[0] == [(1,)] and answers[3] == [(2,)]
    assert isinstance(answers[1], psycopg.errors.UniqueViolation)
    assert isinstance(answers[2], psycopg.DataError)
    assert await loop_conn.call("SELECT n FROM t ORDER BY n", ()) == [(1,), (2,)]


async def test_a_statement_is_prepared_once_and_again_after_it_failed(
    loop_conn: LoopConnection,
) -> None:
    query = "SELECT 10 / %s::int"
    assert await loop_conn.exchange([(query, (1,)), (query, (2,))]) == [[(10,)], [(5,)]]
    assert await loop_conn.call(query, (5,)) == [(2,)]
    assert await prepared(loop_conn, "SELECT 10 / $1::int") == 1
    [failed] = await loop_conn.exchange([(query, (0,))])
    assert isinstance(failed, psycopg.errors.DivisionByZero)
    assert await loop_conn.call(query, (10,)) == [(1,)]
    assert await prepared(loop_conn, "SELECT 10 / $1::int") == 2  # under a new name
    with pytest.raises(Fallback):  # a refused lone statement: the worker thread's way
        await loop_conn.call(query, (0,))


async def test_a_busy_connection_falls_back_and_a_large_exchange_goes_whole(
    loop_conn: LoopConnection,
) -> None:
    big = "x" * 1_000_000  # more than the socket takes at once, both ways
    statements = [("SELECT %s::text", (big,))] * 20
    results: list[Any] = []

    async def exchange() -> None:
        results.append(await loop_conn.exchange(statements))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(exchange)
        await trio.testing.wait_all_tasks_blocked()  # it waits for the server
        with pytest.raises(Fallback):
            await loop_conn.call("SELECT 1", ())
    [answers] = results
    assert answers == [[(big,)]] * 20
