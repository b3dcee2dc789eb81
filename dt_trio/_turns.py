"""Work deferred to the end of the event loop's turn.

Trio runs the tasks that are ready in batches, then waits for I/O. What many tasks ask for in
one batch (bytes to write on a connection, say) is cheapest done once, as the batch ends: one
send instead of one per task, and no task of its own woken to do it (a turn of the event loop
each time). `at_turn_end` gives that moment, through a trio instrument's `before_io_wait`,
which trio calls after every batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import trio

from dt_trio._log import get_logger

log = get_logger(__name__)


class _TurnEnd(trio.abc.Instrument):
    """Calls what was asked for during a batch, as it ends."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._due: list[Callable[[], None]] = []

    def add(self, callback: Callable[[], None]) -> None:
        self._due.append(callback)

    def before_io_wait(self, timeout: float) -> None:
        if not self._due:
            return
        due, self._due = self._due, []
        for callback in due:
            try:
                callback()
            except Exception:  # a bug: said, and never the end of the others' callbacks
                log.exception("a callback at the end of the event loop's turn failed")
        if timeout and trio.lowlevel.current_statistics().tasks_runnable:
            # A callback woke a task, but trio already chose to sleep until the next I/O or
            # deadline: cut the sleep short (unless the run is ending).
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(_nothing)


def _nothing() -> None:
    pass


_turn_end: trio.lowlevel.RunVar[_TurnEnd] = trio.lowlevel.RunVar("dt_trio_turn_end")


def at_turn_end(callback: Callable[[], None]) -> None:
    """Call `callback` once, in the event loop's thread, when the current batch of ready tasks
    has run (before trio waits for I/O). Asked for twice, it is called twice: callers keep
    their own flag. It runs outside any task, so it must not await; it may wake tasks."""
    try:
        turn_end = _turn_end.get()
    except LookupError:
        turn_end = _TurnEnd(trio.lowlevel.current_trio_token())
        trio.lowlevel.add_instrument(turn_end)
        _turn_end.set(turn_end)
    turn_end.add(callback)
