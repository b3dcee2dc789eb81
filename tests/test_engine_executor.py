"""The executor's side of a worker's GetWorkItems stream: what is queued for a stream that
ends is never lost; answers with and without completion tokens; health pings."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from dt_trio._core._commit import WorkKind
from dt_trio._engine import RemoteExecutor
from dt_trio._engine._executor import HEALTH_PING_INTERVAL, Route, WorkAbandoned, WorkUnclaimed
from dt_trio._errors import InvalidRequest, UnknownWorkItem
from dt_trio._proto import orchestrator_service_pb2 as pb

pytestmark = pytest.mark.store_independent


def activity(name: str, instance_id: str | None = None, task_id: int = 0) -> pb.WorkItem:
    item = pb.WorkItem()
    item.activityRequest.name = name
    item.activityRequest.orchestrationInstance.instanceId = instance_id or name
    item.activityRequest.taskId = task_id
    return item


async def test_items_queued_for_a_stream_cancelled_between_them_are_given_back() -> None:
    executor = RemoteExecutor()
    outcomes: dict[str, str] = {}

    async def run(name: str) -> None:
        try:
            await executor.execute(activity(name), Route(WorkKind.ACTIVITY, name))
        except WorkAbandoned:
            outcomes[name] = "abandoned"

    async with trio.open_nursery() as nursery:
        for name in ("a", "b", "c"):  # queued in this order
            nursery.start_soon(run, name)
            await trio.testing.wait_all_tasks_blocked()
        # All three wait in the stream's queue as it connects: it takes them one by one
        # without waiting for each to arrive.
        stream = executor.stream(pb.GetWorkItemsRequest())
        first = await stream.__anext__()
        assert first.activityRequest.name == "a"
        with trio.CancelScope() as scope:
            scope.cancel()  # the worker goes away while "b" and "c" are still queued
            await stream.__anext__()
        assert scope.cancelled_caught
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        await trio.testing.wait_all_tasks_blocked()
        # "a" was sent, and "b" taken from the queue as the stream was cancelled: both are
        # abandoned with the stream (their processors retry them); "c", never taken, waits
        # for the next stream. None is stranded.
        assert outcomes == {"a": "abandoned", "b": "abandoned"}
        replacement = executor.stream(pb.GetWorkItemsRequest())
        with trio.fail_after(5):
            assert (await replacement.__anext__()).activityRequest.name == "c"
        await replacement.aclose()
        nursery.cancel_scope.cancel()


async def test_an_answer_its_check_accepts_is_answered_as_it_is_delivered() -> None:
    """A worker's Complete*Task rpc does not wait for the processor to take the answer: the
    item's check runs in the rpc, and the processor gets what it made of the answer. (Its
    commit, or if that fails the item's redelivery, is the processor's.)"""
    executor = RemoteExecutor()
    checked: list[object] = []

    def check(response: object) -> object:
        checked.append(response)
        return "what the processor needs"

    async with trio.open_nursery() as nursery:
        answers: list[object] = []

        async def processor() -> None:
            answers.append(
                await executor.execute(activity("a"), Route(WorkKind.ACTIVITY, "a"), None, check)
            )

        nursery.start_soon(processor)
        stream = executor.stream(pb.GetWorkItemsRequest())
        sent = await stream.__anext__()
        pending = executor.lookup(sent.completionToken)
        response = pb.ActivityResponse(completionToken=sent.completionToken)
        answered = trio.Event()

        async def complete() -> None:
            await executor.complete(pending, response)
            answered.set()

        nursery.start_soon(complete)
        await trio.testing.wait_all_tasks_blocked()
        assert answered.is_set()  # without the processor's turn, nor any commit
        assert checked == [response]
        assert answers == [pending] and pending.checked == "what the processor needs"
        executor.finish(pending)
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_an_answer_its_check_refuses_is_refused_and_the_item_handed_out_again() -> None:
    executor = RemoteExecutor()

    def check(response: object) -> object:
        raise ValueError("not the answer to this item")

    async with trio.open_nursery() as nursery:
        outcomes: list[str] = []

        async def processor() -> None:
            try:
                await executor.execute(activity("a"), Route(WorkKind.ACTIVITY, "a"), None, check)
            except WorkAbandoned as exc:
                outcomes.append(f"abandoned, again in {exc.delay} s")

        nursery.start_soon(processor)
        stream = executor.stream(pb.GetWorkItemsRequest())
        sent = await stream.__anext__()
        pending = executor.lookup(sent.completionToken)
        with pytest.raises(ValueError, match="not the answer"):
            await executor.complete(pending, pb.ActivityResponse())
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes == ["abandoned, again in 0.0 s"]
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_an_answer_for_another_kind_of_work_is_refused_and_the_item_handed_out_again() -> (
    None
):
    executor = RemoteExecutor()
    async with trio.open_nursery() as nursery:
        outcomes: list[str] = []

        async def processor() -> None:
            try:
                await executor.execute(activity("a"), Route(WorkKind.ACTIVITY, "a"))
            except WorkAbandoned as exc:
                outcomes.append(f"abandoned, again in {exc.delay} s")

        nursery.start_soon(processor)
        stream = executor.stream(pb.GetWorkItemsRequest())
        sent = await stream.__anext__()
        assert executor.lookup(sent.completionToken, kind=WorkKind.ACTIVITY).token
        with pytest.raises(InvalidRequest, match="an activity work item, not an orchestration"):
            executor.lookup(sent.completionToken, kind=WorkKind.ORCHESTRATION)
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes == ["abandoned, again in 0.0 s"]
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_idle_streams_get_health_pings_only_once_their_worker_is_known_to_read_them(
    autojump_clock: trio.abc.Clock,
) -> None:
    """durabletask-go's worker (an empty request, answers without tokens) logs every health
    ping as an unknown work item; the SDKs that take 120 s of silence for a lost stream send
    their concurrency limits. A worker that answers with a token reads pings too."""
    executor = RemoteExecutor()
    modern = executor.stream(pb.GetWorkItemsRequest(maxConcurrentActivityWorkItems=10))
    old = executor.stream(pb.GetWorkItemsRequest())
    start = trio.current_time()
    assert (await modern.__anext__()).HasField("healthPing")
    assert trio.current_time() - start == HEALTH_PING_INTERVAL
    await modern.aclose()
    start = trio.current_time()

    async def processor() -> None:
        await trio.sleep(3 * HEALTH_PING_INTERVAL)
        pending = await executor.execute(activity("a"), Route(WorkKind.ACTIVITY, "a"), None, str)
        executor.finish(pending)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(processor)
        first = await old.__anext__()
        assert first.HasField("activityRequest")  # three intervals idle, and no ping
        assert trio.current_time() - start == 3 * HEALTH_PING_INTERVAL
        answered = executor.lookup(first.completionToken)  # an answer with its token
        await executor.complete(answered, pb.ActivityResponse(instanceId="a"))
        assert (await old.__anext__()).HasField("healthPing")
    await old.aclose()


async def test_two_items_an_answer_without_token_would_both_name_never_wait_at_such_workers() -> (
    None
):
    """An activity of an instance's old execution still runs when its new execution (after
    continue-as-new) schedules the same task id: a token-less answer names both. The second
    waits until the first is settled, unless a worker seen to answer with tokens takes it."""
    executor = RemoteExecutor()
    answers: dict[int, object] = {}

    async def processor(n: int, name: str, task_id: int = 7) -> None:
        item = activity(name, "i", task_id)
        pending = await executor.execute(item, Route(WorkKind.ACTIVITY, name), None, lambda r: r)
        answers[n] = pending.checked
        executor.finish(pending)

    async def read(stream: Any, into: list[pb.WorkItem]) -> None:
        async for item in stream:
            into.append(item)

    def answer(result: str, task_id: int = 7, token: str = "") -> pb.ActivityResponse:
        response = pb.ActivityResponse(instanceId="i", taskId=task_id, completionToken=token)
        response.result.value = result
        return response

    key = (WorkKind.ACTIVITY, "i", 7)
    old: list[pb.WorkItem] = []
    modern: list[pb.WorkItem] = []
    only_b = pb.GetWorkItemsRequest()
    only_b.workItemFilters.activities.add(name="b")
    async with trio.open_nursery() as nursery:
        # Two workers: one of durabletask-go's generation, one that takes only "b".
        nursery.start_soon(read, executor.stream(only_b), modern)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(read, executor.stream(pb.GetWorkItemsRequest()), old)
        nursery.start_soon(processor, 1, "a")
        await trio.testing.wait_all_tasks_blocked()
        assert len(old) == 1
        nursery.start_soon(processor, 2, "a")
        await trio.testing.wait_all_tasks_blocked()
        assert len(old) == 1  # the second waits: an answer "i, task 7" would name both
        executor.deliver(executor.lookup("", key), answer("first"))
        await trio.testing.wait_all_tasks_blocked()
        assert answers == {1: answer("first")} and len(old) == 2  # now the second goes
        executor.deliver(executor.lookup("", key), answer("second"))
        await trio.testing.wait_all_tasks_blocked()
        assert answers[2] == answer("second")
        with pytest.raises(UnknownWorkItem):  # nothing waits any more
            executor.lookup("", key)

        # A worker seen to answer with a token can tell the two apart: it takes the second
        # at once.
        nursery.start_soon(processor, 3, "b", 1)
        await trio.testing.wait_all_tasks_blocked()
        (seen,) = modern
        executor.deliver(
            executor.lookup(seen.completionToken), answer("b", 1, seen.completionToken)
        )
        nursery.start_soon(processor, 4, "a")
        await trio.testing.wait_all_tasks_blocked()
        assert len(old) == 3
        nursery.start_soon(processor, 5, "b")  # the same key, for the worker with tokens
        await trio.testing.wait_all_tasks_blocked()
        assert len(modern) == 2
        # The token-less answer names the item in the token-less worker's hands only.
        executor.deliver(executor.lookup("", key), answer("fourth"))
        executor.deliver(
            executor.lookup(modern[1].completionToken),
            answer("fifth", token=modern[1].completionToken),
        )
        await trio.testing.wait_all_tasks_blocked()
        assert answers[4] == answer("fourth") and answers[5].result.value == "fifth"  # type: ignore[attr-defined]
        nursery.cancel_scope.cancel()


async def test_work_no_connected_worker_takes_goes_back_untried_after_a_while(
    autojump_clock: trio.abc.Clock,
) -> None:
    """An item waits `unclaimed_seconds` for a worker that takes it (none is connected, or
    their filters leave it out), then goes back untried (`WorkUnclaimed`), for whoever can
    run it. One behind busy workers that take it waits as long as it must."""
    executor = RemoteExecutor(unclaimed_seconds=1.5)
    only_b = pb.GetWorkItemsRequest(maxConcurrentActivityWorkItems=1)
    only_b.workItemFilters.activities.add(name="b")
    outcomes: dict[str, tuple[str, float]] = {}
    start = trio.current_time()

    async def run(name: str) -> None:
        try:
            pending = await executor.execute(activity(name), Route(WorkKind.ACTIVITY, name))
            outcomes[name] = ("answered", trio.current_time() - start)
            executor.finish(pending)
        except WorkUnclaimed:
            outcomes[name] = ("unclaimed", trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        taken: list[pb.WorkItem] = []
        nursery.start_soon(read, executor.stream(only_b), taken)  # takes only "b"
        await trio.testing.wait_all_tasks_blocked()
        for name in ("a", "b", "c"):
            nursery.start_soon(run, name)
        await trio.sleep(60)
        # "b" waits for its answer; nobody would ever take "a" or "c"
        assert [i.activityRequest.name for i in taken if i.HasField("activityRequest")] == ["b"]
        assert outcomes == {"a": ("unclaimed", 1.5), "c": ("unclaimed", 1.5)}
        nursery.cancel_scope.cancel()


async def read(stream: Any, into: list[pb.WorkItem]) -> None:
    async for item in stream:
        into.append(item)


async def test_work_waiting_for_busy_workers_goes_back_once_the_last_that_takes_it_leaves(
    autojump_clock: trio.abc.Clock,
) -> None:
    executor = RemoteExecutor(unclaimed_seconds=1.5)
    one_at_a_time = pb.GetWorkItemsRequest(maxConcurrentActivityWorkItems=1)
    outcomes: dict[str, str] = {}

    async def run(name: str) -> None:
        try:
            await executor.execute(activity(name), Route(WorkKind.ACTIVITY, name))
            outcomes[name] = "answered"
        except WorkAbandoned:
            outcomes[name] = "abandoned"
        except WorkUnclaimed:
            outcomes[name] = f"unclaimed after {trio.current_time() - left:.1f} s"

    async with trio.open_nursery() as nursery:
        stream = executor.stream(one_at_a_time)
        nursery.start_soon(run, "first")
        assert (await stream.__anext__()).activityRequest.name == "first"
        nursery.start_soon(run, "queued")
        await trio.sleep(60)
        assert outcomes == {}  # queued behind the busy worker, which takes it: it waits
        left = trio.current_time()
        await stream.aclose()
        await trio.sleep(60)
        # The item it held is abandoned (tried, and counted); the queued one was never tried.
        assert outcomes == {"first": "abandoned", "queued": "unclaimed after 1.5 s"}
