"""`dt-trio entities ...`: list, inspect, signal and clean durable entities."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable

from dt_trio._ops._output import ENTITY_COLUMNS, Detail, Listing, emit, entity_record
from dt_trio._ops._sidecar import Sidecar, SidecarError, run
from dt_trio._proto import orchestrator_service_pb2 as pb

# Entities asked for in one QueryEntities call.
PAGE_SIZE = 500


def entity_id(text: str) -> str:
    """An entity id as the protocol writes it, '@name@key'; 'name@key' is taken too."""
    return text if text.startswith("@") else f"@{text}"


def list_entities(args: argparse.Namespace) -> int:
    async def found(sidecar: Sidecar) -> list[pb.EntityMetadata]:
        query = pb.EntityQuery(includeState=True, includeTransient=args.transient)
        query.pageSize.value = PAGE_SIZE
        if args.prefix:
            query.instanceIdStartsWith.value = entity_id(args.prefix)
        entities: list[pb.EntityMetadata] = []
        while True:
            page: pb.QueryEntitiesResponse = await sidecar.call(
                "QueryEntities", pb.QueryEntitiesRequest(query=query)
            )
            entities.extend(page.entities)
            if args.limit is not None and len(entities) >= args.limit:
                return entities[: args.limit]
            if not page.continuationToken.value:
                return entities
            query.continuationToken.value = page.continuationToken.value

    records = [entity_record(entity) for entity in run(args.target, found)]
    emit(Listing(records, ENTITY_COLUMNS), args.output)
    return 0


def show(args: argparse.Namespace) -> int:
    instance_id = entity_id(args.entity_id)

    async def got(sidecar: Sidecar) -> pb.EntityMetadata:
        request = pb.GetEntityRequest(instanceId=instance_id, includeState=True)
        response: pb.GetEntityResponse = await sidecar.call("GetEntity", request)
        if not response.exists:
            raise SidecarError("NOT_FOUND", f"no entity with id '{instance_id}'")
        return response.entity

    emit(Detail(entity_record(run(args.target, got))), args.output)
    return 0


def signal(args: argparse.Namespace) -> int:
    request = pb.SignalEntityRequest(
        instanceId=entity_id(args.entity_id), name=args.operation, requestId=str(uuid.uuid4())
    )
    if args.input is not None:
        request.input.value = args.input
    run(args.target, lambda sidecar: sidecar.call("SignalEntity", request))
    record = {"instanceId": request.instanceId, "operation": args.operation, "result": "signaled"}
    emit(Detail(record), args.output)
    return 0


def clean(args: argparse.Namespace) -> int:
    async def cleaned(sidecar: Sidecar) -> tuple[int, int]:
        request = pb.CleanEntityStorageRequest(
            removeEmptyEntities=args.remove_empty,
            releaseOrphanedLocks=args.release_orphaned_locks,
        )
        removed = released = 0
        while True:  # a sidecar may answer in parts, each with a token for the next
            response: pb.CleanEntityStorageResponse = await sidecar.call(
                "CleanEntityStorage", request
            )
            removed += response.emptyEntitiesRemoved
            released += response.orphanedLocksReleased
            if not response.continuationToken.value:
                return removed, released
            request.continuationToken.value = response.continuationToken.value

    removed, released = run(args.target, cleaned)
    record = {"emptyEntitiesRemoved": removed, "orphanedLocksReleased": released}
    emit(Detail(record), args.output)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": list_entities,
    "show": show,
    "signal": signal,
    "clean": clean,
}
