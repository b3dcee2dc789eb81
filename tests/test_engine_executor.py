"""The executor's side of a worker's GetWorkItems stream: what is queued for a stream that
ends is never lost."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from dt_trio._core._commit import WorkKind
from dt_trio._engine import RemoteExecutor
from dt_trio._engine._executor import Route, WorkAbandoned
from dt_trio._proto import orchestrator_service_pb2 as pb


def activity(name: str) -> pb.WorkItem:
    item = pb.WorkItem()
    item.activityRequest.name = name
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
