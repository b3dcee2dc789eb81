"""Client operations on a task hub, shared by the gRPC service and the local Python API.

Everything a client does to an instance (start it, wait on it, raise events, terminate, suspend,
resume) goes through here once, in store terms; the two front ends only translate arguments
and results.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Mapping
from datetime import datetime

from dt_trio._core import (
    InstanceState,
    Status,
    check_entity_id,
    is_entity_id,
    new_instance,
    signal_event,
)
from dt_trio._core import _events as ev
from dt_trio._core import _operations as ops
from dt_trio._engine._dispatch import Dispatcher
from dt_trio._engine._dispatch import utc_now as _now
from dt_trio._engine._signals import Signals
from dt_trio._errors import FailedPrecondition, InstanceNotFound, InvalidRequest
from dt_trio._log import get_logger
from dt_trio._proto import orchestrator_service_pb2 as pb
from dt_trio._store import Backend

log = get_logger(__name__)


class HubClient:
    """Instance operations over a store; waits are woken by the store's commits."""

    def __init__(
        self,
        store: Backend,
        signals: Signals,
        dispatch: Dispatcher | None = None,
    ) -> None:
        self.store = store
        self.signals = signals
        # Where an instance that starts now goes straight from its creation (see `start`).
        self.dispatch = dispatch

    async def start(
        self,
        name: str,
        *,
        instance_id: str | None = None,
        input: str | None = None,
        version: str | None = None,
        tags: Mapping[str, str] | None = None,
        start_at: datetime | None = None,
        execution_id: str | None = None,
        trace: pb.TraceContext | None = None,
        replaceable: Collection[Status] | None = None,
    ) -> str:
        """Create an instance (PENDING until `start_at`, if given); returns its id."""
        if not name:
            raise InvalidRequest("the orchestrator name is required and must not be empty")
        instance_id = instance_id or uuid.uuid4().hex
        if is_entity_id(instance_id):
            raise InvalidRequest(
                f"instanceId '{instance_id[:200]}' starts with '@', which is reserved for "
                "entity ids"
            )
        now = _now()
        state, started = new_instance(
            now,
            name,
            instance_id,
            execution_id or uuid.uuid4().hex,
            input=input,
            version=version,
            tags=tags,
            start_at=start_at,
            trace=trace,
        )
        visible = start_at if start_at is not None and start_at > now else now
        allowed = frozenset(replaceable) if replaceable is not None else None
        if self.dispatch is not None:
            await self.dispatch.start(state, started, visible, now, allowed)
        else:
            await self.store.apply(ops.start(state, started, visible, now, allowed))
        log.info(
            "%s: created orchestration '%s'",
            instance_id,
            name,
            extra={"instance_id": instance_id, "orchestration": name},
        )
        return instance_id

    async def wait(
        self, instance_id: str, done: Callable[[InstanceState], bool]
    ) -> InstanceState | None:
        """The instance once `done` holds (None if it does not exist). Waits for as long as
        it takes: bound it with the caller's deadline or cancel scope."""
        change = self.signals.instance_event(instance_id)
        try:
            state = await self.store.get_instance(instance_id)
            while state is not None and not done(state):
                await change.wait()
                # What the latest commit wrote (later ones fire the next change), else read.
                known = change.state
                self.signals.release(instance_id, change)
                change = self.signals.instance_event(instance_id)
                state = known if known is not None else await self.store.get_instance(instance_id)
            return state
        finally:
            self.signals.release(instance_id, change)

    async def signal_entity(
        self,
        entity_id: str,
        operation: str,
        input: str | None,
        *,
        at: datetime | None = None,
        request_id: str | None = None,
    ) -> None:
        """Queue an operation for an entity (`@name@key`), at `at` if that is later."""
        try:
            entity_id = check_entity_id(entity_id)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if not operation:
            raise InvalidRequest("name (the operation) is required and must not be empty")
        now = _now()
        event = signal_event(now, entity_id, operation, input, request_id or uuid.uuid4().hex, at)
        visible = at if at and at > now else now
        await self.store.apply(ops.signal_entity(entity_id, event, visible, now))

    async def raise_event(self, instance_id: str, name: str, data: str | None) -> None:
        if not name:
            raise InvalidRequest("the event name is required and must not be empty")
        now = _now()
        await self.store.apply(ops.send_event(instance_id, ev.event_raised(now, name, data), now))

    async def restart(self, instance_id: str, new_instance_id: bool = False) -> str:
        """Start a finished instance again with its name, input, version and tags, under its
        own id or (`new_instance_id`) a new one; returns the id it runs under."""
        old = await self.store.get_instance(instance_id) if instance_id else None
        if old is None:
            raise InstanceNotFound(instance_id)
        if not old.status.is_terminal:
            raise FailedPrecondition(
                f"instance '{old.instance_id}' is {old.status.label}; only a finished "
                "instance can be restarted"
            )
        # A restart carries no trace context: the new run goes on in the trace the first one
        # was started in (the SDK's spans need one to form a tree).
        history = await self.store.get_history(old.instance_id)
        first = next((e.executionStarted for e in history if e.HasField("executionStarted")), None)
        return await self.start(
            old.name,
            instance_id=uuid.uuid4().hex if new_instance_id else old.instance_id,
            input=old.input,
            version=old.version,
            tags=dict(old.tags),
            trace=first.parentTraceContext
            if first is not None and first.HasField("parentTraceContext")
            else None,
            replaceable={old.status},
        )

    async def rewind(self, instance_id: str, reason: str | None) -> None:
        """Run a failed instance again from its failed steps; the SDK rewrites the history."""
        event = ev.new_event(_now())
        event.executionRewound.SetInParent()
        ev.set_str(event.executionRewound.reason, reason)
        await self.store.apply(ops.rewind(instance_id, event, _now()))

    async def terminate(self, instance_id: str, output: str | None, recursive: bool) -> None:
        await self._control(instance_id, ev.execution_terminated(_now(), output, recursive))

    async def suspend(self, instance_id: str, reason: str | None) -> None:
        await self._control(instance_id, ev.execution_suspended(_now(), reason))

    async def resume(self, instance_id: str, reason: str | None) -> None:
        await self._control(instance_id, ev.execution_resumed(_now(), reason))

    async def _control(self, instance_id: str, event: pb.HistoryEvent) -> None:
        """Deliver terminate/suspend/resume; a finished instance ignores them."""
        state = await self.store.get_instance(instance_id) if instance_id else None
        if state is None:
            raise InstanceNotFound(instance_id)
        if state.status.is_terminal:
            return
        await self.store.apply(ops.send_event(instance_id, event, _now()))
