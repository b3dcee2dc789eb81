"""The executor's side of a worker's GetWorkItems stream: what is queued for a stream that
ends is never lost."""

from __future__ import annotations

import pytest
import trio
import trio.testing

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
            await executor.execute(activity(name), Route("activity", name))
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


async def test_an_activity_result_is_answered_as_it_is_delivered() -> None:
    """The worker's CompleteActivityTask does not wait for the processor to take the result:
    a result that matches its item needs no more checking, and its commit (or, if that
    fails, the activity's redelivery) is the processor's."""
    executor = RemoteExecutor()
    item = activity("a")
    item.activityRequest.taskId = 3
    item.activityRequest.orchestrationInstance.instanceId = "i1"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(executor.execute, item, Route("activity", "a"))
        stream = executor.stream(pb.GetWorkItemsRequest())
        sent = await stream.__anext__()
        pending = executor.lookup(sent.completionToken)
        response = pb.ActivityResponse(
            instanceId="i1", taskId=3, completionToken=sent.completionToken
        )
        answered = trio.Event()

        async def complete() -> None:
            await executor.complete(pending, response)
            answered.set()

        nursery.start_soon(complete)
        await trio.testing.wait_all_tasks_blocked()
        at_once = answered.is_set()  # nobody has taken the result yet
        executor.finish(pending)  # (lets a waiting answer go, so that the test ends)
        assert at_once and pending.response is response
        await stream.aclose()
        nursery.cancel_scope.cancel()
