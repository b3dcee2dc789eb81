"""What both stores' queries share: their conditions (filters, page keys) as SQL and its
parameters, each store with its own placeholder and its own values for times; their pages."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

R = TypeVar("R")


def split_page(rows: list[R], page_size: int) -> tuple[list[R], R | None]:
    """The page in `rows` (a query for one row more than `page_size`), and its last row if
    another page follows."""
    page = rows[:page_size]
    return page, page[-1] if len(rows) > page_size and page else None


class Conditions:
    """SQL conditions joined by AND, and their parameters in order. `mark` is the store's
    placeholder (sqlite's `?`, psycopg's `%s`), `time` the value its columns hold for a time."""

    def __init__(self, mark: str, time: Callable[[datetime], object]) -> None:
        self.mark = mark
        self.time = time
        self.clauses: list[str] = []
        self.params: list[object] = []

    def add(self, clause: str, *params: object) -> None:
        """A condition, with the store's placeholder for each of `params`."""
        self.clauses.append(clause)
        self.params.extend(params)

    def between(self, column: str, start: datetime | None, end: datetime | None) -> None:
        """`column` from `start` (inclusive) to before `end`; None leaves that side open."""
        if start is not None:
            self.add(f"{column} >= {self.mark}", self.time(start))
        if end is not None:
            self.add(f"{column} < {self.mark}", self.time(end))

    def where(self) -> str:
        """` WHERE` and the conditions, or nothing if there are none."""
        return " WHERE " + " AND ".join(self.clauses) if self.clauses else ""
