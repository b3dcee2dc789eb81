"""The Python client of an in-process task hub: start, wait on and manage orchestrations."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dt_trio._core import InstanceState, Status, check_entity_id
from dt_trio._engine import HubClient
from dt_trio._errors import InstanceNotFound, InvalidRequest
from dt_trio._local._registry import Registry
from dt_trio._local._replay import Orchestrator, decode, encode, failed, name_of
from dt_trio._local._tasks import TaskFailedError
from dt_trio._store import InstanceFilter


@dataclass(frozen=True)
class OrchestrationState:
    """An orchestration instance as the store has it; payloads decoded from JSON."""

    instance_id: str
    name: str
    status: Status
    created_at: datetime
    last_updated_at: datetime
    completed_at: datetime | None
    input: Any
    output: Any
    custom_status: Any
    failure: TaskFailedError | None

    @classmethod
    def of(cls, state: InstanceState) -> OrchestrationState:
        return cls(
            instance_id=state.instance_id,
            name=state.name,
            status=state.status,
            created_at=state.created_at,
            last_updated_at=state.last_updated_at,
            completed_at=state.completed_at,
            input=decode(state.input),
            output=decode(state.output),
            custom_status=decode(state.custom_status),
            failure=failed(state.failure) if state.failure is not None else None,
        )


@dataclass(frozen=True)
class EntityMetadata:
    """An entity as the store has it; `state` decoded from JSON."""

    entity_id: str
    state: Any
    last_modified_at: datetime
    locked_by: str | None  # the orchestration holding its lock
    backlog: int  # operations and lock messages queued for it


def entity_id(name: str, key: str) -> str:
    """The id of entity `name` with `key`: ``@name@key``, the name in lower case."""
    return check_entity_id(f"@{name}@{key}", "the entity")


class Client:
    """Manage the orchestrations of a task hub from Python (`open_task_hub` gives one).

    The waits have no timeout of their own: bound them with ``trio.fail_after``.
    """

    def __init__(self, hub: HubClient, registry: Registry | None = None) -> None:
        self._hub = hub
        # In a hub that serves no SDK workers: the only orchestrators it can run.
        self._registry = registry

    async def schedule(
        self,
        orchestrator: Orchestrator | str,
        input: Any = None,
        *,
        instance_id: str | None = None,
        start_at: datetime | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Start an orchestration (at `start_at`, if given); returns its instance id.
        `InstanceExists` if `instance_id` is taken by an instance that has not finished;
        `InvalidRequest` if the hub has no orchestrator of that name."""
        name = name_of(orchestrator)
        known = self._registry.orchestrators if self._registry is not None else None
        if known is not None and name not in known:
            raise InvalidRequest(
                f"no orchestrator named '{name[:200]}' is registered in this hub, which runs "
                f"only its registry's ({', '.join(sorted(known)[:20]) or 'none'}); register "
                "it, or serve SDK workers with dt_trio.serve"
            )
        return await self._hub.start(
            name,
            instance_id=instance_id,
            input=encode(input),
            tags=tags,
            start_at=start_at,
        )

    async def get(self, instance_id: str) -> OrchestrationState | None:
        state = await self._hub.store.get_instance(instance_id)
        return None if state is None else OrchestrationState.of(state)

    async def wait_for_start(self, instance_id: str) -> OrchestrationState:
        return await self.wait_until(instance_id, lambda s: s.status != Status.PENDING)

    async def wait_for_completion(self, instance_id: str) -> OrchestrationState:
        """The instance once it has completed, failed or been terminated."""
        return await self.wait_until(instance_id, lambda s: s.status.is_terminal)

    async def wait_until(
        self, instance_id: str, done: Callable[[OrchestrationState], bool]
    ) -> OrchestrationState:
        """The instance once `done` holds for it; woken by its commits, never polling."""
        state = await self._hub.wait(instance_id, lambda s: done(OrchestrationState.of(s)))
        if state is None:
            raise InstanceNotFound(instance_id)
        return OrchestrationState.of(state)

    async def signal_entity(
        self,
        entity_id: str,
        operation: str,
        input: Any = None,
        *,
        signal_time: datetime | None = None,
    ) -> None:
        """Send an operation to an entity (at `signal_time`, if given)."""
        await self._hub.signal_entity(entity_id, operation, encode(input), at=signal_time)

    async def get_entity(self, entity_id: str) -> EntityMetadata | None:
        """The entity, or None if it has no state."""
        entity = await self._hub.store.get_entity(check_entity_id(entity_id, "the entity"))
        if entity is None or entity.state is None:
            return None
        return EntityMetadata(
            entity.instance_id,
            decode(entity.state),
            entity.last_modified_at,
            entity.lock_owner,
            entity.backlog,
        )

    async def raise_event(self, instance_id: str, name: str, data: Any = None) -> None:
        await self._hub.raise_event(instance_id, name, encode(data))

    async def terminate(
        self, instance_id: str, output: Any = None, *, recursive: bool = True
    ) -> None:
        await self._hub.terminate(instance_id, encode(output), recursive)

    async def suspend(self, instance_id: str, reason: str | None = None) -> None:
        await self._hub.suspend(instance_id, reason)

    async def resume(self, instance_id: str, reason: str | None = None) -> None:
        await self._hub.resume(instance_id, reason)

    async def purge(self, instance_id: str, *, recursive: bool = True) -> int:
        """Delete a finished instance (and its finished sub-orchestrations); the count."""
        return await self._hub.store.purge(instance_id, recursive)

    async def query(
        self,
        *,
        statuses: Collection[Status] | None = None,
        created_from: datetime | None = None,
        created_to: datetime | None = None,
        id_prefix: str | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[OrchestrationState]:
        """Instances matching the filter, oldest first, fetched a page at a time."""
        where = InstanceFilter(
            statuses=frozenset(statuses) if statuses else None,
            created_from=created_from,
            created_to=created_to,
            id_prefix=id_prefix,
        )
        after = None
        while True:
            states, after = await self._hub.store.query_instances(where, page_size, after)
            for state in states:
                yield OrchestrationState.of(state)
            if after is None:
                return
