"""A gRPC server that stores nothing and does no more than the bench's workloads need: what
the SDK worker does when its server costs next to nothing.

Both servers in the bench drive the same SDK worker, which runs in the bench's process and
does most of the work of a fan-out: every activity and every replay goes through its threads
and its event loop. This server hands work out the moment it exists (grpcio, like the
reference), keeps instances in a dict, and steps an orchestration only once every activity it
waits for is in, so the worker replays each history as few times as possible. Where the
worker is the bottleneck, no server gets much more out of it than this one does. It is no
server otherwise: it knows only what the bench's orchestrations do (schedule activities,
complete), keeps nothing, and would stall an orchestration that waits for any one of its
activities.

    python tests/bench/noop.py --port 4001
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import empty_pb2

from dt_trio._proto import orchestrator_service_pb2 as pb

SERVICE = "TaskHubSidecarService"


def now() -> datetime:
    return datetime.now(UTC)


@dataclasses.dataclass
class Instance:
    instance_id: str
    name: str
    created: datetime
    history: list[pb.HistoryEvent] = dataclasses.field(default_factory=list)
    new: list[pb.HistoryEvent] = dataclasses.field(default_factory=list)
    stepping: bool = False
    running: int = 0  # activities without a result yet
    state: pb.OrchestrationState | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class NoOp:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances: dict[str, Instance] = {}
        self._work: queue.Queue[pb.WorkItem] = queue.Queue()
        self._tokens = itertools.count()

    def _step_if_ready(self, instance: Instance) -> None:
        """Send the instance's next step if it has new events, runs none, and waits for no
        activity (the caller holds the lock)."""
        if instance.stepping or not instance.new or instance.running:
            return
        started = pb.HistoryEvent(eventId=-1, timestamp=now())
        started.orchestratorStarted.SetInParent()
        new, instance.new = [started, *instance.new], []
        request = pb.OrchestratorRequest(
            instanceId=instance.instance_id, pastEvents=instance.history, newEvents=new
        )
        instance.history.extend(new)
        instance.stepping = True
        self._work.put(pb.WorkItem(orchestratorRequest=request, completionToken=self._token()))

    def _token(self) -> str:
        return str(next(self._tokens))

    def Hello(self, request: empty_pb2.Empty, context: Any) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    def StartInstance(self, request: pb.CreateInstanceRequest, context: Any) -> Any:
        instance = Instance(request.instanceId or uuid.uuid4().hex, request.name, now())
        event = pb.HistoryEvent(eventId=-1, timestamp=instance.created)
        event.executionStarted.name = request.name
        event.executionStarted.orchestrationInstance.instanceId = instance.instance_id
        if request.HasField("input"):
            event.executionStarted.input.CopyFrom(request.input)
        with self._lock:
            self._instances[instance.instance_id] = instance
            instance.new.append(event)
            self._step_if_ready(instance)
        return pb.CreateInstanceResponse(instanceId=instance.instance_id)

    def GetWorkItems(self, request: pb.GetWorkItemsRequest, context: Any) -> Iterator[Any]:
        while context.is_active():
            try:
                yield self._work.get(timeout=0.5)
            except queue.Empty:
                pass

    def CompleteOrchestratorTask(self, request: pb.OrchestratorResponse, context: Any) -> Any:
        with self._lock:
            instance = self._instances[request.instanceId]
            instance.stepping = False
            for action in request.actions:
                kind = action.WhichOneof("orchestratorActionType")
                if kind == "scheduleTask":
                    task = action.scheduleTask
                    event = pb.HistoryEvent(eventId=action.id, timestamp=now())
                    event.taskScheduled.name = task.name
                    event.taskScheduled.input.CopyFrom(task.input)
                    instance.history.append(event)
                    instance.running += 1
                    activity = pb.ActivityRequest(
                        name=task.name, input=task.input, taskId=action.id
                    )
                    activity.orchestrationInstance.instanceId = instance.instance_id
                    self._work.put(
                        pb.WorkItem(activityRequest=activity, completionToken=self._token())
                    )
                elif kind == "completeOrchestration":
                    done = action.completeOrchestration
                    instance.state = pb.OrchestrationState(
                        instanceId=instance.instance_id,
                        name=instance.name,
                        orchestrationStatus=done.orchestrationStatus,
                        output=done.result,
                        failureDetails=done.failureDetails,
                        createdTimestamp=instance.created,
                        lastUpdatedTimestamp=now(),
                    )
                    instance.done.set()
                else:
                    context.abort(grpc.StatusCode.UNIMPLEMENTED, f"no {kind} here")
            self._step_if_ready(instance)
        return pb.CompleteTaskResponse()

    def CompleteActivityTask(self, request: pb.ActivityResponse, context: Any) -> Any:
        event = pb.HistoryEvent(eventId=-1, timestamp=now())
        if request.HasField("failureDetails"):
            event.taskFailed.taskScheduledId = request.taskId
            event.taskFailed.failureDetails.CopyFrom(request.failureDetails)
        else:
            event.taskCompleted.taskScheduledId = request.taskId
            event.taskCompleted.result.CopyFrom(request.result)
        with self._lock:
            instance = self._instances[request.instanceId]
            instance.running -= 1
            instance.new.append(event)
            self._step_if_ready(instance)
        return pb.CompleteTaskResponse()

    def WaitForInstanceCompletion(self, request: pb.GetInstanceRequest, context: Any) -> Any:
        instance = self._instances[request.instanceId]
        instance.done.wait(context.time_remaining())
        if instance.state is None:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "not completed in time")
        return pb.GetInstanceResponse(exists=True, orchestrationState=instance.state)


def handlers(noop: NoOp) -> grpc.GenericRpcHandler:
    def unary(method: Callable[..., Any], request_type: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method,
            request_deserializer=request_type.FromString,
            response_serializer=lambda message: message.SerializeToString(),
        )

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Hello": unary(noop.Hello, empty_pb2.Empty),
            "StartInstance": unary(noop.StartInstance, pb.CreateInstanceRequest),
            "CompleteOrchestratorTask": unary(
                noop.CompleteOrchestratorTask, pb.OrchestratorResponse
            ),
            "CompleteActivityTask": unary(noop.CompleteActivityTask, pb.ActivityResponse),
            "WaitForInstanceCompletion": unary(
                noop.WaitForInstanceCompletion, pb.GetInstanceRequest
            ),
            "GetWorkItems": grpc.unary_stream_rpc_method_handler(
                noop.GetWorkItems,
                request_deserializer=pb.GetWorkItemsRequest.FromString,
                response_serializer=lambda message: message.SerializeToString(),
            ),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    # one thread per open call: the worker's stream, its waiters, its pool's completions
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    server.add_generic_rpc_handlers((handlers(NoOp()),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
