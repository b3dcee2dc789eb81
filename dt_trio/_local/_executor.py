"""The local executor: orchestrators and activities of this process, run in the hub itself.

Orchestrators replay synchronously in the processor's task (pure CPU, no I/O). `async def`
activities run in the processor's task too, inside the hub's nursery, and are cancelled with
it; plain-function activities run in worker threads, so they may block.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import trio

from dt_trio._core import _events as ev
from dt_trio._engine._executor import ACTIVITY, ORCHESTRATION, Route
from dt_trio._local._registry import Registry
from dt_trio._local._replay import decode, encode, failure_details, run_orchestrator
from dt_trio._proto import orchestrator_service_pb2 as pb


@dataclass(frozen=True)
class ActivityContext:
    """What an activity knows about its call."""

    orchestration_id: str
    task_id: int


@dataclass(frozen=True)
class LocalAnswer:
    """An answer computed in this process (nobody waits for `finish`)."""

    response: object


class LocalExecutor:
    """Runs the work items whose names are in `registry`."""

    def __init__(self, registry: Registry, thread_limit: int = 16) -> None:
        self._registry = registry
        self._threads = trio.CapacityLimiter(thread_limit)

    def accepts(self, route: Route) -> bool:
        if route.kind == ORCHESTRATION:
            return route.name in self._registry.orchestrators
        if route.kind == ACTIVITY:
            return route.name in self._registry.activities
        return False

    async def execute(self, work_item: pb.WorkItem, route: Route) -> LocalAnswer:
        if route.kind == ORCHESTRATION:
            fn = self._registry.orchestrators[route.name]
            response = run_orchestrator(fn, work_item.orchestratorRequest)
            await trio.lowlevel.checkpoint()
            return LocalAnswer(response)
        request = work_item.activityRequest
        return LocalAnswer(await self._activity(self._registry.activities[route.name], request))

    async def _activity(self, fn: Any, request: pb.ActivityRequest) -> pb.ActivityResponse:
        response = pb.ActivityResponse(
            instanceId=request.orchestrationInstance.instanceId, taskId=request.taskId
        )
        ctx = ActivityContext(request.orchestrationInstance.instanceId, request.taskId)
        try:
            value = decode(ev.opt_str(request, "input"))
            if inspect.iscoroutinefunction(fn):
                result = await fn(ctx, value)
            else:
                # A blocking activity never stalls the hub; on shutdown the hub stops waiting
                # for it and the activity runs again after a restart (at-least-once).
                result = await trio.to_thread.run_sync(
                    fn, ctx, value, limiter=self._threads, abandon_on_cancel=True
                )
            ev.set_str(response.result, encode(result))
        except Exception as exc:
            response.failureDetails.CopyFrom(failure_details(exc))
        return response

    def finish(self, answer: object, error: BaseException | None = None) -> None:
        """Nothing waits on a local answer's commit."""
