"""The limiter every `trio.to_thread.run_sync` of dt-trio goes through."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import trio

T = TypeVar("T")


class ThreadLimiter:
    """At most `total` threads at a time, like `trio.CapacityLimiter` (which it wraps, and
    whose first-come-first-served queue it keeps), but a call that finds a place free takes it
    without a turn of the event loop.

    `trio.to_thread.run_sync` takes any object with `acquire_on_behalf_of` and
    `release_on_behalf_of`. `CapacityLimiter.acquire_on_behalf_of` yields to the event loop
    even when a token is free, so every hand-off to a thread waited for the tasks of one more
    turn (traced in the sidecar: about 0.1 ms before each sqlite commit's thread started).
    Nothing is lost by not yielding there: `run_sync` has checked for cancellation just
    before, and yields while the thread runs.
    """

    def __init__(self, total: int) -> None:
        self._limiter = trio.CapacityLimiter(total)

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        try:
            # refused while others queue for a place, so they keep their turn
            self._limiter.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            await self._limiter.acquire_on_behalf_of(borrower)

    def release_on_behalf_of(self, borrower: object) -> None:
        self._limiter.release_on_behalf_of(borrower)


async def run_sync(
    fn: Callable[..., T], *args: Any, limiter: ThreadLimiter, abandon_on_cancel: bool = False
) -> T:
    """`trio.to_thread.run_sync(fn, *args)` through `limiter` (trio types its `limiter` as a
    CapacityLimiter, and documents that any object with the two methods will do)."""
    return await trio.to_thread.run_sync(
        fn, *args, limiter=cast(trio.CapacityLimiter, limiter), abandon_on_cancel=abandon_on_cancel
    )
