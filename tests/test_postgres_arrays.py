"""The arrays the store sends in PostgreSQL's binary format (dt_trio/_store/_postgres/_arrays.py)
come back from a real PostgreSQL as they were sent."""

from __future__ import annotations

import datetime

import psycopg
import pytest

from dt_trio._store._postgres._arrays import (
    BigintArray,
    ByteaArray,
    TextArray,
    TimestamptzArray,
    register,
)

pytestmark = pytest.mark.postgres_only

UTC = datetime.UTC


@pytest.mark.parametrize(
    ("array", "cast"),
    [
        (ByteaArray([b"", b"\x00\xff binary", b"x" * 70_000]), "bytea[]"),
        (TextArray(["plain", None, "ünïcödé ✓", ""]), "text[]"),
        (BigintArray([0, -1, 2**63 - 1, -(2**63)]), "bigint[]"),
        (
            TimestamptzArray(
                [
                    datetime.datetime(2026, 12, 7, 5, 44, 30, 470717, tzinfo=UTC),
                    datetime.datetime(
                        1999, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))
                    ),
                ]
            ),
            "timestamptz[]",
        ),
        (ByteaArray(), "bytea[]"),
        (TextArray(), "text[]"),
        (BigintArray(), "bigint[]"),
        (TimestamptzArray(), "timestamptz[]"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, list) else v,
)
def test_an_array_comes_back_as_it_was_sent(
    pg_address: str, array: list[object], cast: str
) -> None:
    with psycopg.connect(pg_address, autocommit=True) as conn:
        register(conn.adapters)
        conn.execute("SET TimeZone TO 'UTC'")
        cursor = conn.cursor(binary=True)
        [(back, length)] = cursor.execute(
            f"SELECT %s::{cast}, cardinality(%s::{cast})", (array, array), prepare=True
        ).fetchall()
    assert back == list(array) and length == len(array)
