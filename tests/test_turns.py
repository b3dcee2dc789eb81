"""Work deferred to the end of the event loop's turn (dt_trio._turns)."""

from __future__ import annotations

import logging

import pytest
import trio

from dt_trio._turns import at_turn_end

pytestmark = pytest.mark.store_independent


async def test_callbacks_run_once_in_order_when_the_turn_that_asked_for_them_ends() -> None:
    seen: list[str] = []
    at_turn_end(lambda: seen.append("first"))
    at_turn_end(lambda: seen.append("second"))
    seen.append("the rest of the turn")
    await trio.lowlevel.checkpoint()  # the next turn
    assert seen == ["the rest of the turn", "first", "second"]
    await trio.lowlevel.checkpoint()
    assert seen == ["the rest of the turn", "first", "second"]


async def test_a_task_woken_at_the_turns_end_runs_though_the_loop_was_to_sleep() -> None:
    """Nothing else is ready: trio chose to sleep until the deadline before the callback woke
    the task, and must not."""
    woken = trio.Event()
    at_turn_end(woken.set)
    started = trio.current_time()
    with trio.fail_after(10):
        await woken.wait()
    assert trio.current_time() - started < 5


async def test_a_failing_callback_is_logged_and_the_others_run_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[int] = []
    at_turn_end(lambda: seen.append(1 // 0))
    at_turn_end(lambda: seen.append(1))
    with caplog.at_level(logging.ERROR):
        await trio.lowlevel.checkpoint()
    assert seen == [1]
    assert "ZeroDivisionError" in caplog.text
    at_turn_end(lambda: seen.append(2))
    await trio.lowlevel.checkpoint()
    assert seen == [1, 2]
