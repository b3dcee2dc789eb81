"""Worker streams: work-item filters and concurrency hints decide which worker gets what."""

from __future__ import annotations

import queue
import threading
from typing import Any

import grpc
import pytest
from _harness import Sidecar, sdk_client, sdk_worker, wait_until
from durabletask import client, task, worker
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs


def plus_one(ctx: task.ActivityContext, n: int) -> int:
    return n + 1


def alpha(ctx: task.OrchestrationContext, n: int) -> Any:
    return (yield ctx.call_activity(plus_one, input=n))


def beta(ctx: task.OrchestrationContext, _: Any) -> Any:
    return "beta"


def fan(ctx: task.OrchestrationContext, n: int) -> Any:
    return sum((yield task.when_all([ctx.call_activity(plus_one, input=i) for i in range(n)])))


def filtered_worker(address: str, orchestrators: list[Any], activities: list[Any]) -> Any:
    w = worker.TaskHubGrpcWorker(host_address=address)
    for o in orchestrators:
        w.add_orchestrator(o)
    for a in activities:
        w.add_activity(a)
    w.use_work_item_filters()  # derived from what is registered
    return w


def test_each_worker_gets_only_what_its_filters_accept(sidecar: Sidecar) -> None:
    a = filtered_worker(sidecar.address, [alpha], [plus_one])
    b = filtered_worker(sidecar.address, [beta], [])
    a.start()
    b.start()
    try:
        c = sdk_client(sidecar.address)
        ids = [c.schedule_new_orchestration(alpha, input=i) for i in range(5)]
        ids += [c.schedule_new_orchestration(beta) for _ in range(5)]
        for instance_id in ids:
            # a worker handed an orchestrator it lacks would fail the instance
            state = c.wait_for_orchestration_completion(instance_id, timeout=30)
            assert state is not None
            assert state.runtime_status == client.OrchestrationStatus.COMPLETED
    finally:
        a.stop()
        b.stop()


def test_work_no_connected_worker_accepts_waits_for_one_that_does(sidecar: Sidecar) -> None:
    only_beta = filtered_worker(sidecar.address, [beta], [])
    only_beta.start()
    try:
        wait_until(lambda: "worker stream 1 connected" in sidecar.log_text(), what="a stream")
        c = sdk_client(sidecar.address)
        instance_id = c.schedule_new_orchestration(alpha, input=1)
        waits = "orchestration 'alpha' waits: no code in this process and no connected SDK"
        wait_until(lambda: waits in sidecar.log_text(), what="the log line")
        second = c.schedule_new_orchestration(alpha, input=2)
        with pytest.raises(TimeoutError):
            c.wait_for_orchestration_start(second, timeout=1.0)
        assert sidecar.log_text().count(waits) == 1  # said once, not per work item
        state = c.get_orchestration_state(instance_id)
        assert state is not None and state.runtime_status == client.OrchestrationStatus.PENDING
        with sdk_worker(sidecar.address, [alpha], [plus_one]):
            done = c.wait_for_orchestration_completion(instance_id, timeout=30)
            assert c.wait_for_orchestration_completion(second, timeout=30) is not None
        assert done is not None and done.serialized_output == "2"
    finally:
        only_beta.stop()


def test_a_stream_never_holds_more_activities_than_its_hint(sidecar: Sidecar) -> None:
    # An SDK worker runs the orchestrations only (its filters accept no activity); a raw
    # stream that asks for at most one activity at a time runs the activities.
    orchestrations = worker.TaskHubGrpcWorker(host_address=sidecar.address)
    orchestrations.add_orchestrator(fan)
    orchestrations.use_work_item_filters(
        worker.WorkItemFilters(orchestrations=[worker.OrchestrationWorkItemFilter(name="fan")])
    )
    orchestrations.start()
    received: queue.Queue[Any] = queue.Queue()
    channel = grpc.insecure_channel(sidecar.address)
    stub = stubs.TaskHubSidecarServiceStub(channel)
    request = pb.GetWorkItemsRequest(maxConcurrentActivityWorkItems=1)
    request.workItemFilters.activities.add(name="plus_one")
    stream = stub.GetWorkItems(request)

    def read() -> None:
        try:
            for item in stream:
                if item.HasField("activityRequest"):
                    received.put(item)
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        c = sdk_client(sidecar.address)
        instance_id = c.schedule_new_orchestration(fan, input=3)
        total = 0
        for _ in range(3):
            item = received.get(timeout=20)
            # while this one is unanswered, no second activity may arrive
            with pytest.raises(queue.Empty):
                received.get(timeout=0.5)
            n = int(item.activityRequest.input.value)
            response = pb.ActivityResponse(
                instanceId=item.activityRequest.orchestrationInstance.instanceId,
                taskId=item.activityRequest.taskId,
                completionToken=item.completionToken,
            )
            response.result.value = str(n + 1)
            stub.CompleteActivityTask(response)
            total += n + 1
        state = c.wait_for_orchestration_completion(instance_id, timeout=30)
        assert state is not None and state.serialized_output == str(total) == "6"
    finally:
        stream.cancel()
        channel.close()
        orchestrations.stop()


def test_entity_work_goes_only_to_workers_whose_filters_name_the_entity(
    sidecar: Sidecar,
) -> None:
    from durabletask import entities

    ran: queue.Queue[tuple[str, str]] = queue.Queue()

    def make(worker_name: str) -> Any:
        def entity(ctx: entities.EntityContext, _: Any) -> None:
            ran.put((worker_name, ctx.entity_id.entity))

        return entity

    left = worker.TaskHubGrpcWorker(host_address=sidecar.address)
    left.add_entity(make("left"), name="Left")  # names are matched without case
    left.use_work_item_filters()
    right = worker.TaskHubGrpcWorker(host_address=sidecar.address)
    right.add_entity(make("right"), name="right")
    right.use_work_item_filters()
    left.start()
    right.start()
    try:
        c = sdk_client(sidecar.address)
        for n in range(4):
            c.signal_entity(entities.EntityInstanceId("left", f"k{n}"), "op")
            c.signal_entity(entities.EntityInstanceId("RIGHT", f"k{n}"), "op")
        seen = [ran.get(timeout=15) for _ in range(8)]
        assert sorted(seen) == [("left", "left")] * 4 + [("right", "right")] * 4
    finally:
        left.stop()
        right.stop()
