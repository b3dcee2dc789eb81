"""Arrays of one known type, sent to PostgreSQL in its binary array format.

psycopg dumps a plain list by looking at its items each time to choose their type (its
`ListDumper`): on the commits the engine makes most (write_step's dozen arrays) that was about
a twentieth of the sidecar's time. A list of one of these classes says its items' type
instead; its dumper writes the array's header and each item with psycopg's own dumper of
that type (so encodings and time zones are psycopg's). `register` makes a connection use
them; the lists stay lists everywhere else.
"""

from __future__ import annotations

import datetime
import struct
from typing import Any, ClassVar

from psycopg import abc, adapt, postgres, pq

# array_recv's header: dimensions, whether there are NULLs, the items' type, then for the one
# dimension its length and lower bound; each item follows as its length (-1: NULL) and bytes.
_HEADER = struct.Struct("!iiIii")
_EMPTY = struct.Struct("!iiI")
_LENGTH = struct.Struct("!i")
_NULL = _LENGTH.pack(-1)


class ByteaArray(list[bytes]):
    """A `bytea[]` parameter."""

    item: ClassVar[type] = bytes
    oid: ClassVar[int] = postgres.types["bytea"].oid


class TextArray(list[str | None]):
    """A `text[]` parameter (items may be None)."""

    item: ClassVar[type] = str
    oid: ClassVar[int] = postgres.types["text"].oid


class BigintArray(list[int]):
    """A `bigint[]` parameter."""

    item: ClassVar[type] = int
    oid: ClassVar[int] = postgres.types["int8"].oid


class TimestamptzArray(list[datetime.datetime]):
    """A `timestamptz[]` parameter (aware datetimes)."""

    item: ClassVar[type] = datetime.datetime
    oid: ClassVar[int] = postgres.types["timestamptz"].oid


_ARRAYS: tuple[type[ByteaArray | TextArray | BigintArray | TimestamptzArray], ...] = (
    ByteaArray,
    TextArray,
    BigintArray,
    TimestamptzArray,
)


class _ArrayDumper(adapt.Dumper):
    format = pq.Format.BINARY

    def __init__(self, cls: type, context: abc.AdaptContext | None = None) -> None:
        super().__init__(cls, context)
        adapters = context.adapters if context is not None else postgres.adapters
        item_oid: int = cls.oid  # type: ignore[attr-defined]
        item_type = adapters.types[item_oid]
        self.oid = item_type.array_oid
        dumper = adapters.get_dumper_by_oid(item_oid, pq.Format.BINARY)
        self._item_oid = item_oid
        self._dump_item = dumper(cls.item, context).dump  # type: ignore[attr-defined]

    def dump(self, obj: Any) -> bytes:
        if not obj:
            return _EMPTY.pack(0, 0, self._item_oid)
        dump = self._dump_item
        parts: list[Any] = [b""]
        nulls = 0
        for item in obj:
            data = None if item is None else dump(item)
            if data is None:
                parts.append(_NULL)
                nulls = 1
            else:
                parts.append(_LENGTH.pack(len(data)))
                parts.append(data)
        parts[0] = _HEADER.pack(1, nulls, self._item_oid, len(obj), 1)
        return b"".join(parts)


def register(adapters: adapt.AdaptersMap) -> None:
    """Dump this module's arrays on connections that use `adapters`."""
    for cls in _ARRAYS:
        adapters.register_dumper(cls, _ArrayDumper)
