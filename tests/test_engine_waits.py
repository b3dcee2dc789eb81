"""Waiting on an instance: woken by commits, answered from what they wrote, nothing left over."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import trio
import trio.testing
from _harness import StoreClass, store_args

from dt_trio._core import InstanceState, Status
from dt_trio._core import _events as ev
from dt_trio._core import _operations as ops
from dt_trio._engine import HubClient, Signals


@pytest.fixture
async def hub() -> AsyncIterator[tuple[Signals, StoreClass, HubClient]]:
    signals = Signals()
    store = StoreClass(*store_args(), listener=signals)
    await store.open()
    try:
        yield signals, store, HubClient(store, signals)
    finally:
        await store.close()


async def pending_instance(store: StoreClass) -> InstanceState:
    t = datetime.now(UTC)
    state = InstanceState("i1", "orch", "e1", Status.PENDING, t, t)
    started = ev.execution_started(t, name="orch", instance_id="i1", execution_id="e1", input=None)
    await store.apply(ops.start(state, started, t, t))
    return state


async def parked(signals: Signals, instance_id: str, waiters: int) -> None:
    """Until `waiters` wait on the instance's next change (their store reads, which run in
    threads, done: wait_all_tasks_blocked counts a task waiting for a thread as blocked)."""
    while True:
        change = signals._instances.get(instance_id)
        if change is not None and not change.fired and change.waiters == waiters:
            await trio.testing.wait_all_tasks_blocked()
            if not change.fired and change.waiters == waiters:
                return
        await trio.sleep(0.001)


async def test_a_waiter_gets_the_latest_of_changes_made_before_it_woke(
    hub: tuple[Signals, StoreClass, HubClient],
) -> None:
    signals, store, client = hub
    state = await pending_instance(store)
    got: list[InstanceState | None] = []

    async def wait() -> None:
        got.append(await client.wait("i1", lambda s: s.status.is_terminal))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            running = dataclasses.replace(state, status=Status.RUNNING)
            done = dataclasses.replace(state, status=Status.COMPLETED, output='"x"')
            # two commits before the waiter runs again: it must not settle for the first
            signals.instance_changed("i1", running)
            signals.instance_changed("i1", done)
    # answered from the commit, not from the store (which still says PENDING)
    assert got == [done]
    assert signals._instances == {}


async def test_a_change_without_a_state_is_read_from_the_store(
    hub: tuple[Signals, StoreClass, HubClient],
) -> None:
    signals, store, client = hub
    state = await pending_instance(store)
    got: list[InstanceState | None] = []

    async def wait() -> None:
        got.append(await client.wait("i1", lambda s: s.status != Status.PENDING))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            signals.instance_changed("i1", dataclasses.replace(state, status=Status.RUNNING))
            signals.instance_changed("i1")  # e.g. purged: only the store knows
            await parked(signals, "i1", waiters=2)
            assert got == []  # both read the store, which still says PENDING, and wait on
            signals.instance_changed("i1", dataclasses.replace(state, status=Status.FAILED))
    assert [s.status for s in got if s is not None] == [Status.FAILED, Status.FAILED]
    assert signals._instances == {}


async def test_waiting_on_a_finished_or_missing_instance_leaves_nothing_registered(
    hub: tuple[Signals, StoreClass, HubClient],
) -> None:
    signals, store, client = hub
    assert await client.wait("missing", lambda s: True) is None
    await pending_instance(store)
    assert await client.wait("i1", lambda s: True) is not None
    with trio.move_on_after(0.01):
        await client.wait("i1", lambda s: False)  # cancelled while waiting
    assert signals._instances == {}
