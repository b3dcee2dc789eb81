"""Durable tasks an orchestrator yields: activity and sub-orchestration results, timers, external
events, and their compositions (when_all, when_any).

A task completes only while the replay engine feeds history to it, so nothing here ever waits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class TaskFailedError(Exception):
    """A durable task failed: an activity or sub-orchestration raised, or gave up retrying.

    `error_type` and `message` are those of the original error (which may have been raised in
    another process or by another SDK); `stack_trace` when known.
    """

    def __init__(self, error_type: str, message: str, stack_trace: str | None = None) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.stack_trace = stack_trace


class NonDeterminismError(Exception):
    """The orchestrator, replayed against its history, did something else than the first time.

    Orchestrator code must make the same durable calls in the same order on every replay (see
    the determinism rules in the README); the orchestration fails with this error otherwise.
    """


class Task(Generic[T]):
    """A durable result an orchestrator can yield; the replay engine completes it."""

    def __init__(self) -> None:
        self._done = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._listeners: list[Callable[[Task[Any]], None]] = []

    @property
    def is_complete(self) -> bool:
        return self._done

    @property
    def is_failed(self) -> bool:
        return self._done and self._error is not None

    def get_result(self) -> T:
        """The result; raises the failure of a failed task, RuntimeError for a pending one."""
        if not self._done:
            raise RuntimeError("the task has not completed yet")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[no-any-return]

    def _resolve(self, result: Any, error: BaseException | None) -> None:
        if self._done:
            return
        self._done, self._result, self._error = True, result, error
        for listener in self._listeners:
            listener(self)

    def _on_done(self, listener: Callable[[Task[Any]], None]) -> None:
        if self._done:
            listener(self)
        else:
            self._listeners.append(listener)


class CompletableTask(Task[T]):
    """A task completed by one history event (a result, a timer, an event)."""

    def complete(self, result: T) -> None:
        self._resolve(result, None)

    def fail(self, error: BaseException) -> None:
        self._resolve(None, error)


class WhenAllTask(Task[list[Any]]):
    """Completes with every child's result, in order, or fails with the first failure."""

    def __init__(self, children: Sequence[Task[Any]]) -> None:
        super().__init__()
        self._children = list(children)
        self._left = len(self._children)
        if not self._children:
            self._resolve([], None)
        for child in self._children:
            child._on_done(self._child_done)

    def _child_done(self, child: Task[Any]) -> None:
        if child._error is not None:
            self._resolve(None, child._error)
            return
        self._left -= 1
        if self._left == 0:
            self._resolve([c._result for c in self._children], None)


class WhenAnyTask(Task[Task[Any]]):
    """Completes with the first child to complete (the child itself, failed or not)."""

    def __init__(self, children: Sequence[Task[Any]]) -> None:
        super().__init__()
        if not children:
            raise ValueError("when_any needs at least one task")
        for child in children:
            child._on_done(lambda c: self._resolve(c, None))


def when_all(tasks: Sequence[Task[Any]]) -> WhenAllTask:
    """A task that completes when all `tasks` have (fan-in)."""
    return WhenAllTask(tasks)


def when_any(tasks: Sequence[Task[Any]]) -> WhenAnyTask:
    """A task that completes when the first of `tasks` does; its result is that task."""
    return WhenAnyTask(tasks)


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed activity or sub-orchestration is tried again, with durable timers between.

    The n-th retry waits `first_retry_interval * backoff_coefficient ** (n - 1)`, at most
    `max_retry_interval`; after `max_number_of_attempts` attempts in all, the failure stands.
    `handle` decides which failures are retried (all by default).
    """

    first_retry_interval: timedelta
    max_number_of_attempts: int
    backoff_coefficient: float = 1.0
    max_retry_interval: timedelta | None = None
    handle: Callable[[TaskFailedError], bool] | None = None

    def __post_init__(self) -> None:
        if self.first_retry_interval <= timedelta(0):
            raise ValueError("first_retry_interval must be positive")
        if self.max_number_of_attempts < 1:
            raise ValueError("max_number_of_attempts must be at least 1")
        if self.backoff_coefficient < 1:
            raise ValueError("backoff_coefficient must be at least 1")

    def delay(self, attempt: int) -> timedelta:
        """The wait after the `attempt`-th failed attempt."""
        wait = self.first_retry_interval * (self.backoff_coefficient ** (attempt - 1))
        if self.max_retry_interval is not None:
            wait = min(wait, self.max_retry_interval)
        return wait
