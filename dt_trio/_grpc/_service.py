"""TaskHubSidecarService: the client rpcs and the worker stream, over the store and executor."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from google.protobuf import empty_pb2

from dt_trio import _core as core
from dt_trio._core import EntityState, InstanceState, Status
from dt_trio._core import _events as ev
from dt_trio._core import _operations as ops
from dt_trio._core._commit import WorkKind
from dt_trio._engine import HubClient, RemoteExecutor
from dt_trio._engine._dispatch import utc_now as _now
from dt_trio._errors import InstanceNotFound, InvalidRequest
from dt_trio._grpc import _bounds as bounds
from dt_trio._grpc._transport import immediate
from dt_trio._log import get_logger
from dt_trio._proto import orchestrator_service_grpc as grpc_stubs
from dt_trio._proto import orchestrator_service_pb2 as pb
from dt_trio._store import Backend, EntityFilter, FinishedFilter, InstanceFilter, PageKey

log = get_logger(__name__)

Predicate = Callable[[InstanceState], bool]

# An item a worker hands back (AbandonTask*WorkItem) is retried after this long.
WORKER_ABANDON_DELAY_SECONDS = 1.0

# SkipGracefulOrchestrationTerminations takes at most this many instances per call.
MAX_SKIP_GRACEFUL = 500

# Query pages: the default and the largest page; bigger requests get continuation tokens.
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
PAGE_TOKEN_VERSION = "k1"
ENTITY_PAGE_TOKEN_VERSION = "e1"
# A filtered purge deletes this many instances per transaction, so writers never wait long.
PURGE_BATCH = 500

# StreamInstanceHistory chunks: at most this many events, and about this many bytes.
HISTORY_CHUNK_EVENTS = 256
HISTORY_CHUNK_BYTES = 1 << 20


def _require(value: str, field: str) -> str:
    if not value:
        raise InvalidRequest(f"{field} is required and must not be empty")
    return value


def _timestamp(parent: Any, field: str) -> datetime | None:
    """A Timestamp field as a datetime; InvalidRequest when it is out of range."""
    return ev.optional_time(parent, field, InvalidRequest)


def _statuses(values: Any, field: str) -> frozenset[Status] | None:
    if not values:
        return None
    try:
        return frozenset(Status(v) for v in values)
    except ValueError as exc:
        raise InvalidRequest(f"{field}: {exc}") from exc


def _page_size(value: int, field: str) -> int:
    if value < 0:
        raise InvalidRequest(f"{field} must not be negative, not {value}")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _page_token(key: PageKey) -> str:
    return f"{PAGE_TOKEN_VERSION}:{key[0]}:{key[1]}"


def _page_key(token: str | None, field: str) -> PageKey | None:
    """Parse a continuation token made by `_page_token`; InvalidRequest for anything else."""
    if not token:
        return None
    version, _, rest = token.partition(":")
    position, _, instance_id = rest.partition(":")
    if version != PAGE_TOKEN_VERSION or not position.isdigit() or not instance_id:
        raise InvalidRequest(f"{field} '{token[:100]}' is not a continuation token of this sidecar")
    return int(position), instance_id


def _entity_id(value: str, field: str = "instanceId") -> str:
    try:
        return core.check_entity_id(_require(value, field), field)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def _entity_message(entity: EntityState, include_state: bool) -> pb.EntityMetadata:
    msg = pb.EntityMetadata(instanceId=entity.instance_id, backlogQueueSize=entity.backlog)
    ev.set_time(msg.lastModifiedTime, entity.last_modified_at)
    ev.set_str(msg.lockedBy, entity.lock_owner)
    if include_state:
        ev.set_str(msg.serializedState, entity.state)
    return msg


T = TypeVar("T")
K = TypeVar("K")


async def _bounded_page(
    fetch: Callable[[int], Awaitable[tuple[list[T], K | None]]],
    size: int,
    cost: Callable[[T], int],
) -> tuple[list[T], K | None]:
    """`fetch(size)`: a page and the key after it, as long as its elements (`cost` each, see
    `bounds.item_cost`) fit in one answer; if they do not, the page is fetched again, as
    long as they fit, so that its continuation starts where it ends."""
    while True:
        items, after = await fetch(size)
        count = bounds.page_length([cost(item) for item in items])
        if count == len(items):
            return items, after
        size = count


def _bounded_state(state: InstanceState, payloads: bool) -> pb.OrchestrationState:
    """An instance as one element of a page (see `bounds.fit`)."""
    msg = _state_message(state, payloads)
    limit = bounds.item_limit(state.instance_id)
    bounds.fit(msg, limit, f"the state of instance '{state.instance_id[:100]}'")
    return msg


def _bounded_entity(entity: EntityState, include_state: bool) -> pb.EntityMetadata:
    """An entity as one element of a page (see `bounds.fit`)."""
    msg = _entity_message(entity, include_state)
    limit = bounds.item_limit(entity.instance_id)
    bounds.fit(msg, limit, f"entity '{entity.instance_id[:100]}'")
    return msg


def _state_message(state: InstanceState, payloads: bool) -> pb.OrchestrationState:
    msg = pb.OrchestrationState(
        instanceId=state.instance_id,
        name=state.name,
        orchestrationStatus=int(state.status),  # type: ignore[arg-type]
    )
    msg.executionId.value = state.execution_id
    ev.set_str(msg.version, state.version)
    ev.set_time(msg.createdTimestamp, state.created_at)
    ev.set_time(msg.lastUpdatedTimestamp, state.last_updated_at)
    if state.completed_at is not None:
        ev.set_time(msg.completedTimestamp, state.completed_at)
    if state.scheduled_start_at is not None:
        ev.set_time(msg.scheduledStartTimestamp, state.scheduled_start_at)
    if payloads:
        # What durabletask-go and the .NET backends count as payloads: without
        # getInputsAndOutputs (fetchInputsAndOutputs) they leave all four out.
        ev.set_str(msg.input, state.input)
        ev.set_str(msg.output, state.output)
        ev.set_str(msg.customStatus, state.custom_status)
        if state.failure is not None:
            msg.failureDetails.CopyFrom(state.failure)
    ev.set_str(msg.parentInstanceId, state.parent_instance_id)
    msg.tags.update(state.tags)
    return msg


def _bounded_event(event: pb.HistoryEvent) -> pb.HistoryEvent:
    """A copy of a history event too large for an answer, its payloads left out (the
    stored event, which the store may keep in memory, is not touched)."""
    copy = pb.HistoryEvent()
    copy.CopyFrom(event)
    bounds.fit(copy, bounds.item_limit(""), f"history event {event.eventId}")
    return copy


class SidecarService(grpc_stubs.TaskHubSidecarServiceServicer):  # type: ignore[misc]
    """Every rpc of TaskHubSidecarService (a test checks that none is missing)."""

    def __init__(self, store: Backend, executor: RemoteExecutor, client: HubClient) -> None:
        self._store = store
        self._executor = executor
        self._client = client

    # -- client rpcs -------------------------------------------------------------------------

    @immediate
    async def Hello(self, request: empty_pb2.Empty) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    async def StartInstance(self, request: pb.CreateInstanceRequest) -> pb.CreateInstanceResponse:
        replaceable = None
        if request.HasField("orchestrationIdReusePolicy"):
            try:
                replaceable = {
                    Status(s) for s in request.orchestrationIdReusePolicy.replaceableStatus
                }
            except ValueError as exc:
                raise InvalidRequest(f"orchestrationIdReusePolicy: {exc}") from exc
        instance_id = await self._client.start(
            _require(request.name, "name (the orchestrator name)"),
            instance_id=request.instanceId or None,
            input=ev.opt_str(request, "input"),
            version=ev.opt_str(request, "version"),
            tags=dict(request.tags),
            start_at=_timestamp(request, "scheduledStartTimestamp"),
            execution_id=ev.opt_str(request, "executionId"),
            trace=request.parentTraceContext if request.HasField("parentTraceContext") else None,
            replaceable=replaceable,
        )
        return pb.CreateInstanceResponse(instanceId=instance_id)

    async def RestartInstance(
        self, request: pb.RestartInstanceRequest
    ) -> pb.RestartInstanceResponse:
        instance_id = await self._client.restart(
            _require(request.instanceId, "instanceId"), request.restartWithNewInstanceId
        )
        return pb.RestartInstanceResponse(instanceId=instance_id)

    async def RewindInstance(self, request: pb.RewindInstanceRequest) -> pb.RewindInstanceResponse:
        await self._client.rewind(
            _require(request.instanceId, "instanceId"), ev.opt_str(request, "reason")
        )
        return pb.RewindInstanceResponse()

    async def SkipGracefulOrchestrationTerminations(
        self, request: pb.SkipGracefulOrchestrationTerminationsRequest
    ) -> pb.SkipGracefulOrchestrationTerminationsResponse:
        """Mark instances terminated in the store at once, without running the orchestrator."""
        ids = list(request.instanceBatch.instanceIds)
        if len(ids) > MAX_SKIP_GRACEFUL:
            raise InvalidRequest(
                f"at most {MAX_SKIP_GRACEFUL} instances can be terminated per call, not {len(ids)}"
            )
        reason = ev.opt_str(request, "reason")
        unterminated = []
        for instance_id in ids:
            if not await self._terminate_now(instance_id, reason):
                unterminated.append(instance_id)
        return pb.SkipGracefulOrchestrationTerminationsResponse(
            unterminatedInstanceIds=unterminated
        )

    async def _terminate_now(self, instance_id: str, reason: str | None) -> bool:
        for _ in range(3):  # the instance may move on between our read and our write
            state = await self._store.get_instance(instance_id) if instance_id else None
            if state is None or state.status.is_terminal:
                return False
            history = await self._store.get_history(instance_id)
            now = _now()
            result = core.terminate_now(state, history, reason, now)
            forced = ops.terminate_forced(result, state.last_updated_at, now)
            if not (await self._store.apply(forced)).alternative:
                log.info("%s: terminated without the orchestrator", instance_id)
                return True
        return False

    async def GetInstance(self, request: pb.GetInstanceRequest) -> pb.GetInstanceResponse:
        _require(request.instanceId, "instanceId")
        state = await self._store.get_instance(request.instanceId)
        return self._instance_response(state, request.getInputsAndOutputs)

    async def WaitForInstanceStart(self, request: pb.GetInstanceRequest) -> pb.GetInstanceResponse:
        return await self._wait(request, lambda s: s.status != Status.PENDING)

    async def WaitForInstanceCompletion(
        self, request: pb.GetInstanceRequest
    ) -> pb.GetInstanceResponse:
        return await self._wait(request, lambda s: s.status.is_terminal)

    async def _wait(
        self, request: pb.GetInstanceRequest, done: Predicate
    ) -> pb.GetInstanceResponse:
        """Answer once `done` holds; the caller's deadline (grpc-timeout) bounds the wait."""
        state = await self._client.wait(_require(request.instanceId, "instanceId"), done)
        return self._instance_response(state, request.getInputsAndOutputs)

    @staticmethod
    def _instance_response(state: InstanceState | None, payloads: bool) -> pb.GetInstanceResponse:
        if state is None:
            return pb.GetInstanceResponse(exists=False)
        response = pb.GetInstanceResponse(exists=True)
        response.orchestrationState.CopyFrom(_state_message(state, payloads))
        bounds.fit(response, what=f"the state of instance '{state.instance_id[:100]}'")
        return response

    async def RaiseEvent(self, request: pb.RaiseEventRequest) -> pb.RaiseEventResponse:
        await self._client.raise_event(
            _require(request.instanceId, "instanceId"),
            _require(request.name, "name (the event name)"),
            ev.opt_str(request, "input"),
        )
        return pb.RaiseEventResponse()

    async def TerminateInstance(self, request: pb.TerminateRequest) -> pb.TerminateResponse:
        await self._client.terminate(
            _require(request.instanceId, "instanceId"),
            ev.opt_str(request, "output"),
            request.recursive,
        )
        return pb.TerminateResponse()

    async def SuspendInstance(self, request: pb.SuspendRequest) -> pb.SuspendResponse:
        await self._client.suspend(
            _require(request.instanceId, "instanceId"), ev.opt_str(request, "reason")
        )
        return pb.SuspendResponse()

    async def ResumeInstance(self, request: pb.ResumeRequest) -> pb.ResumeResponse:
        await self._client.resume(
            _require(request.instanceId, "instanceId"), ev.opt_str(request, "reason")
        )
        return pb.ResumeResponse()

    async def PurgeInstances(self, request: pb.PurgeInstancesRequest) -> pb.PurgeInstancesResponse:
        which = request.WhichOneof("request")
        complete = True
        if which == "instanceId":
            _require(request.instanceId, "instanceId")
            count = await self._store.purge(request.instanceId, request.recursive)
        elif which == "instanceBatch":
            count = 0
            for instance_id in request.instanceBatch.instanceIds:
                count += await self._store.purge(
                    _require(instance_id, "instanceIds[]"), request.recursive
                )
        elif which == "purgeInstanceFilter":
            purge_filter = request.purgeInstanceFilter
            deadline = None
            if purge_filter.HasField("timeout"):
                timeout = purge_filter.timeout
                # Read the fields: ToTimedelta overflows on values a Duration may carry.
                seconds = timeout.seconds + timeout.nanos / 1e9
                if seconds <= 0:
                    raise InvalidRequest("purgeInstanceFilter.timeout must be positive")
                deadline = time.monotonic() + seconds
            where = InstanceFilter(
                statuses=_statuses(purge_filter.runtimeStatus, "purgeInstanceFilter.runtimeStatus"),
                created_from=_timestamp(purge_filter, "createdTimeFrom"),
                created_to=_timestamp(purge_filter, "createdTimeTo"),
            )
            count, complete = await self._store.purge_where(
                where, request.recursive, PURGE_BATCH, deadline
            )
        else:
            raise InvalidRequest(
                "PurgeInstances needs instanceId, instanceBatch or purgeInstanceFilter"
            )
        response = pb.PurgeInstancesResponse(deletedInstanceCount=count)
        response.isComplete.value = complete
        return response

    async def QueryInstances(self, request: pb.QueryInstancesRequest) -> pb.QueryInstancesResponse:
        query = request.query
        where = InstanceFilter(
            statuses=_statuses(query.runtimeStatus, "query.runtimeStatus"),
            created_from=_timestamp(query, "createdTimeFrom"),
            created_to=_timestamp(query, "createdTimeTo"),
            id_prefix=ev.opt_str(query, "instanceIdPrefix") or None,
        )
        after = _page_key(ev.opt_str(query, "continuationToken"), "query.continuationToken")

        async def fetch(size: int) -> tuple[list[pb.OrchestrationState], PageKey | None]:
            states, next_key = await self._store.query_instances(where, size, after)
            return [_bounded_state(s, query.fetchInputsAndOutputs) for s in states], next_key

        messages, next_key = await _bounded_page(
            fetch,
            _page_size(query.maxInstanceCount, "query.maxInstanceCount"),
            lambda m: bounds.item_cost(m.ByteSize(), m.instanceId),
        )
        response = pb.QueryInstancesResponse(orchestrationState=messages)
        if next_key is not None:
            response.continuationToken.value = _page_token(next_key)
        return response

    async def ListInstanceIds(
        self, request: pb.ListInstanceIdsRequest
    ) -> pb.ListInstanceIdsResponse:
        where = FinishedFilter(
            statuses=_statuses(request.runtimeStatus, "runtimeStatus"),
            completed_from=_timestamp(request, "completedTimeFrom"),
            completed_to=_timestamp(request, "completedTimeTo"),
        )
        after = _page_key(ev.opt_str(request, "lastInstanceKey"), "lastInstanceKey")

        async def fetch(size: int) -> tuple[list[str], PageKey | None]:
            return await self._store.list_finished_ids(where, size, after)

        ids, next_key = await _bounded_page(
            fetch,
            _page_size(request.pageSize, "pageSize"),
            lambda i: bounds.item_cost(len(i.encode()), i),
        )
        response = pb.ListInstanceIdsResponse(instanceIds=ids)
        if next_key is not None:
            response.lastInstanceKey.value = _page_token(next_key)
        return response

    async def CreateTaskHub(self, request: pb.CreateTaskHubRequest) -> pb.CreateTaskHubResponse:
        """The store's schema exists once the sidecar runs; `recreateIfExists` empties it."""
        if request.recreateIfExists:
            await self._store.delete_everything()
            log.warning("task hub recreated: every instance was deleted")
        return pb.CreateTaskHubResponse()

    async def DeleteTaskHub(self, request: pb.DeleteTaskHubRequest) -> pb.DeleteTaskHubResponse:
        await self._store.delete_everything()
        log.warning("task hub deleted: every instance was deleted")
        return pb.DeleteTaskHubResponse()

    async def StreamInstanceHistory(
        self, request: pb.StreamInstanceHistoryRequest
    ) -> AsyncIterator[pb.HistoryChunk]:
        """The history of the instance's current execution, in bounded chunks."""
        _require(request.instanceId, "instanceId")
        state = await self._store.get_instance(request.instanceId)
        if state is None:
            raise InstanceNotFound(request.instanceId)
        wanted = ev.opt_str(request, "executionId")
        if wanted and wanted != state.execution_id:
            raise InvalidRequest(
                f"instance '{state.instance_id}' is on execution '{state.execution_id}'; the "
                f"history of execution '{wanted}' is no longer kept"
            )
        history = await self._store.get_history(request.instanceId)
        chunk: list[pb.HistoryEvent] = []
        size = 0
        for event in history:
            event_size = event.ByteSize()
            if event_size > bounds.item_limit(""):
                event = _bounded_event(event)
                event_size = event.ByteSize()
            if chunk and (
                len(chunk) >= HISTORY_CHUNK_EVENTS or size + event_size > HISTORY_CHUNK_BYTES
            ):
                yield pb.HistoryChunk(events=chunk)
                chunk, size = [], 0
            chunk.append(event)
            size += event_size
        if chunk:
            yield pb.HistoryChunk(events=chunk)

    # -- entity rpcs -------------------------------------------------------------------------

    async def SignalEntity(self, request: pb.SignalEntityRequest) -> pb.SignalEntityResponse:
        await self._client.signal_entity(
            _require(request.instanceId, "instanceId"),
            request.name,
            ev.opt_str(request, "input"),
            at=_timestamp(request, "scheduledTime"),
            request_id=request.requestId or None,
        )
        return pb.SignalEntityResponse()

    async def GetEntity(self, request: pb.GetEntityRequest) -> pb.GetEntityResponse:
        entity = await self._store.get_entity(_entity_id(request.instanceId))
        # An entity exists while it has state; one that is only locked or has queued
        # operations is transient (QueryEntities shows it when asked).
        if entity is None or entity.state is None:
            return pb.GetEntityResponse(exists=False)
        response = pb.GetEntityResponse(
            exists=True, entity=_entity_message(entity, request.includeState)
        )
        bounds.fit(response, what=f"entity '{entity.instance_id[:100]}'")
        return response

    async def QueryEntities(self, request: pb.QueryEntitiesRequest) -> pb.QueryEntitiesResponse:
        query = request.query
        where = EntityFilter(
            id_prefix=core.entity_id_prefix(ev.opt_str(query, "instanceIdStartsWith")),
            modified_from=_timestamp(query, "lastModifiedFrom"),
            modified_to=_timestamp(query, "lastModifiedTo"),
            include_transient=query.includeTransient,
        )
        size = query.pageSize.value if query.HasField("pageSize") else 0
        after = None
        token = ev.opt_str(query, "continuationToken")
        if token:
            version, sep, after = token.partition(":")
            if version != ENTITY_PAGE_TOKEN_VERSION or not sep or not after:
                raise InvalidRequest(
                    f"continuationToken '{token[:100]}' is not a continuation token of this sidecar"
                )

        async def fetch(size: int) -> tuple[list[pb.EntityMetadata], str | None]:
            entities, next_after = await self._store.query_entities(where, size, after)
            return [_bounded_entity(e, query.includeState) for e in entities], next_after

        messages, next_after = await _bounded_page(
            fetch,
            _page_size(size, "pageSize"),
            lambda m: bounds.item_cost(m.ByteSize(), m.instanceId),
        )
        response = pb.QueryEntitiesResponse(entities=messages)
        if next_after is not None:
            response.continuationToken.value = f"{ENTITY_PAGE_TOKEN_VERSION}:{next_after}"
        return response

    async def CleanEntityStorage(
        self, request: pb.CleanEntityStorageRequest
    ) -> pb.CleanEntityStorageResponse:
        removed, released = await self._store.clean_entity_storage(
            request.removeEmptyEntities, request.releaseOrphanedLocks
        )
        return pb.CleanEntityStorageResponse(
            emptyEntitiesRemoved=removed, orphanedLocksReleased=released
        )

    # -- worker rpcs -------------------------------------------------------------------------

    async def GetWorkItems(self, request: pb.GetWorkItemsRequest) -> AsyncIterator[pb.WorkItem]:
        async for item in self._executor.stream(request):
            yield item

    # An answer is matched by its completion token; one without (durabletask-go's worker and
    # other SDKs of its generation) by what it names, as durabletask-go's sidecar matches it
    # (see dt_trio._engine._executor).

    @immediate
    async def CompleteOrchestratorTask(
        self, request: pb.OrchestratorResponse
    ) -> pb.CompleteTaskResponse:
        pending = self._executor.lookup(
            request.completionToken,
            (WorkKind.ORCHESTRATION, request.instanceId, -1),
            WorkKind.ORCHESTRATION,
        )
        self._executor.deliver(pending, request)
        return pb.CompleteTaskResponse()

    @immediate
    async def CompleteActivityTask(self, request: pb.ActivityResponse) -> pb.CompleteTaskResponse:
        pending = self._executor.lookup(
            request.completionToken,
            (WorkKind.ACTIVITY, request.instanceId, request.taskId),
            WorkKind.ACTIVITY,
        )
        self._executor.deliver(pending, request)
        return pb.CompleteTaskResponse()

    async def CompleteEntityTask(self, request: pb.EntityBatchResult) -> pb.CompleteTaskResponse:
        # An EntityBatchResult names no entity: only its token can match it (every SDK that
        # reads entityRequestV2, the form dt-trio sends, answers with it).
        pending = self._executor.lookup(request.completionToken, None, WorkKind.ENTITY)
        await self._executor.complete(pending, request)
        return pb.CompleteTaskResponse()

    @immediate
    async def AbandonTaskOrchestratorWorkItem(
        self, request: pb.AbandonOrchestrationTaskRequest
    ) -> pb.AbandonOrchestrationTaskResponse:
        self._abandon(request.completionToken, WorkKind.ORCHESTRATION)
        return pb.AbandonOrchestrationTaskResponse()

    @immediate
    async def AbandonTaskActivityWorkItem(
        self, request: pb.AbandonActivityTaskRequest
    ) -> pb.AbandonActivityTaskResponse:
        self._abandon(request.completionToken, WorkKind.ACTIVITY)
        return pb.AbandonActivityTaskResponse()

    @immediate
    async def AbandonTaskEntityWorkItem(
        self, request: pb.AbandonEntityTaskRequest
    ) -> pb.AbandonEntityTaskResponse:
        self._abandon(request.completionToken, WorkKind.ENTITY)
        return pb.AbandonEntityTaskResponse()

    def _abandon(self, token: str, kind: WorkKind) -> None:
        pending = self._executor.lookup(token, None, kind)
        pending.abandon(WORKER_ABANDON_DELAY_SECONDS)
