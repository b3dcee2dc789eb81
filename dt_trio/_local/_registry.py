"""Orchestrators and activities written in Python, by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from dt_trio._local._replay import Orchestrator, name_of

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """The orchestrators and activities a hub runs in this process.

    Register with the decorators (`@registry.orchestrator`, `@registry.activity`) or the
    `add_*` methods; a function's name is its `__name__` unless `name=` says otherwise. Work
    for names not registered here goes to connected SDK workers, if the hub serves gRPC.
    """

    def __init__(self) -> None:
        self.orchestrators: dict[str, Orchestrator] = {}
        self.activities: dict[str, Callable[..., Any]] = {}
        self.entities: dict[str, Callable[..., Any]] = {}

    def add_orchestrator(self, fn: Orchestrator, *, name: str | None = None) -> str:
        return self._add(self.orchestrators, "orchestrator", fn, name)

    def add_activity(self, fn: Callable[..., Any], *, name: str | None = None) -> str:
        return self._add(self.activities, "activity", fn, name)

    def add_entity(self, fn: Callable[..., Any], *, name: str | None = None) -> str:
        """An entity function `(ctx: EntityContext, input) -> result`; its name is matched
        without case, as entity ids carry it in lower case."""
        key = (name or name_of(fn)).lower()
        if "@" in key:
            raise ValueError(f"entity name '{key}' must not contain '@'")
        return self._add(self.entities, "entity", fn, key)

    def entity(self, fn: F) -> F:
        """Decorator: register `(ctx, input)` as an entity function."""
        self.add_entity(fn)
        return fn

    def orchestrator(self, fn: F) -> F:
        """Decorator: register a generator function `(ctx, input)` as an orchestrator."""
        self.add_orchestrator(fn)
        return fn

    def activity(self, fn: F) -> F:
        """Decorator: register `(ctx, input)` (a plain or an `async def` function) as an
        activity."""
        self.add_activity(fn)
        return fn

    @staticmethod
    def _add(table: dict[str, Any], kind: str, fn: Callable[..., Any], name: str | None) -> str:
        if name is not None:
            fn.__dt_name__ = name  # type: ignore[attr-defined]
        key = name_of(fn)
        if not key:
            raise ValueError(f"an {kind} needs a name")
        if key in table and table[key] is not fn:
            raise ValueError(f"an {kind} named '{key}' is already registered")
        table[key] = fn
        return key
