"""The limiter of dt-trio's hand-offs to threads."""

from __future__ import annotations

import threading

import trio
import trio.testing

from dt_trio._threads import ThreadLimiter, run_sync


class _Steps(trio.abc.Instrument):
    """Counts the times the event loop resumes one task."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.count = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.count += task is self.task


async def test_a_free_place_is_taken_without_a_turn_of_the_event_loop() -> None:
    limiter = ThreadLimiter(2)
    steps = _Steps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        await limiter.acquire_on_behalf_of("a")
        await limiter.acquire_on_behalf_of("b")
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert steps.count == 0  # trio.CapacityLimiter: 2, one turn each


async def test_when_full_callers_wait_and_get_their_places_in_arrival_order() -> None:
    limiter = ThreadLimiter(1)
    await limiter.acquire_on_behalf_of("first")
    order: list[str] = []

    async def take(name: str) -> None:
        await limiter.acquire_on_behalf_of(name)
        order.append(name)

    async with trio.open_nursery() as nursery:
        for name in ("second", "third"):
            nursery.start_soon(take, name)
            await trio.testing.wait_all_tasks_blocked()
        limiter.release_on_behalf_of("first")
        await trio.testing.wait_all_tasks_blocked()
        # a newcomer does not jump the queue while "third" waits
        nursery.start_soon(take, "late")
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["second"]
        limiter.release_on_behalf_of("second")
        await trio.testing.wait_all_tasks_blocked()
        limiter.release_on_behalf_of("third")
    assert order == ["second", "third", "late"]


async def test_threads_run_at_most_the_limit_at_a_time() -> None:
    limiter = ThreadLimiter(2)
    lock = threading.Lock()
    running = peak = 0
    release = threading.Event()

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(5)
        with lock:
            running -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(lambda: run_sync(work, limiter=limiter))
        await trio.sleep(0.05)
        release.set()
    assert peak == 2
