"""Bad input fuzzing: random requests for every rpc of the protocol, built from its descriptors.

Every field of every request message gets random values: empty, huge and odd strings, ids of
instances and entities that exist, integers across their whole range, unknown enum values,
timestamps with out-of-range seconds and nanos, nested messages and repeated fields. Each call
must end with a deliberate gRPC status (never INTERNAL or UNKNOWN, which mean an unhandled
error), the sidecar must stay up, and afterwards the store must be consistent and still run
orchestrations. Hypothesis runs derandomized, so the examples are the same on every run.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from _harness import Sidecar, query_store, running_sidecar, sdk_client, sdk_worker
from durabletask import client, entities, task
from durabletask.internal import orchestrator_service_pb2 as sdk_pb
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SERVICE = sdk_pb.DESCRIPTOR.services_by_name["TaskHubSidecarService"]
# Statuses that mean the sidecar understood the request and refused or served it on purpose.
DELIBERATE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # waits and streams, cut short by the test's deadline
    grpc.StatusCode.OUT_OF_RANGE,
}
KNOWN_IDS = ["fuzz-running", "fuzz-done", "@counter@fuzz", "@counter@", "@", ""]
ODD_STRINGS = ["\x00", "a" * 70_000, "::", "k1:9999999999999999999999:x", "e1:", "0", "-1"]

INT_RANGES = {
    d.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    d.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    d.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def strings() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(KNOWN_IDS), st.sampled_from(ODD_STRINGS), st.text(max_size=40))


def scalar(field: d.FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == d.FieldDescriptor.TYPE_STRING:
        return strings()
    if field.type == d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == d.FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 20)  # proto3 enums are open: unknown values go on the wire
    if field.type in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if field.type == d.FieldDescriptor.TYPE_FLOAT else 64)
    low, high = INT_RANGES[field.type]
    return st.one_of(
        st.integers(low, high),
        st.sampled_from([0, -1, 1, 100, 1001]).filter(lambda v: low <= v <= high),
    )


def messages(descriptor: d.Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    cls = message_factory.GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Timestamp":
        return st.builds(
            cls,
            seconds=st.one_of(
                st.integers(-(2**62), 2**62), st.sampled_from([0, -62135596801, 253402300800])
            ),
            nanos=st.one_of(st.integers(-(2**31), 2**31 - 1), st.just(0)),
        )
    fields = [f for f in descriptor.fields if depth < 3 or f.type != f.TYPE_MESSAGE]

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        msg = cls()
        for field in fields:
            if not draw(st.booleans()):
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                key, value = (
                    field.message_type.fields_by_name["key"],
                    field.message_type.fields_by_name["value"],
                )
                if value.message_type is not None:
                    continue  # map<string, Value>: only in messages the sidecar sends
                entries = draw(st.dictionaries(scalar(key), scalar(value), max_size=3))
                getattr(msg, field.name).update(entries)
            elif field.is_repeated:
                if field.message_type is not None:
                    items = draw(st.lists(messages(field.message_type, depth + 1), max_size=3))
                    getattr(msg, field.name).extend(items)
                else:
                    getattr(msg, field.name).extend(draw(st.lists(scalar(field), max_size=3)))
            elif field.message_type is not None:
                getattr(msg, field.name).CopyFrom(draw(messages(field.message_type, depth + 1)))
            else:
                setattr(msg, field.name, draw(scalar(field)))
        return msg

    return build()


def waits(method: d.MethodDescriptor) -> bool:
    return method.server_streaming or method.name.startswith("WaitFor")


def waiter(ctx: task.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.wait_for_external_event("go"))


def quick(ctx: task.OrchestrationContext, _: Any) -> Any:
    return "ok"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sidecar, grpc.Channel]]:
    tmp: pathlib.Path = tmp_path_factory.mktemp("fuzz")
    with running_sidecar(tmp) as sidecar, grpc.insecure_channel(sidecar.address) as channel:
        with sdk_worker(sidecar.address, [waiter, quick]):
            c = sdk_client(sidecar.address)
            c.schedule_new_orchestration(waiter, instance_id="fuzz-running")
            c.schedule_new_orchestration(quick, instance_id="fuzz-done")
            c.wait_for_orchestration_completion("fuzz-done", timeout=30)
            c.signal_entity(entities.EntityInstanceId("counter", "fuzz"), "add", 1)
        yield sidecar, channel


def call(
    channel: grpc.Channel, method: d.MethodDescriptor, request: Any
) -> tuple[grpc.StatusCode, str]:
    response_type = message_factory.GetMessageClass(method.output_type)
    path = f"/{SERVICE.full_name}/{method.name}"
    timeout = 0.3 if waits(method) else 10.0
    try:
        if method.server_streaming:
            stream = channel.unary_stream(
                path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_type.FromString,
            )(request, timeout=timeout)
            for _ in stream:
                pass
        else:
            channel.unary_unary(
                path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_type.FromString,
            )(request, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=lambda m: m.name)
def test_random_requests_get_a_deliberate_status(
    hub: tuple[Sidecar, grpc.Channel], method: d.MethodDescriptor
) -> None:
    sidecar, channel = hub

    @settings(
        max_examples=30,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(messages(method.input_type))
    def check(request: Any) -> None:
        code, details = call(channel, method, request)
        assert code == grpc.StatusCode.OK or code in DELIBERATE, (
            f"{method.name}({request!r:.300}) answered {code}: {details}"
        )
        assert sidecar.proc is not None and sidecar.proc.poll() is None, "the sidecar died"

    check()


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff\xff",  # not a protobuf message
        b"\x0a\x05abc",  # a truncated string field
        b"\x0b" * 20_000,  # start-group tags nested far past the parser's limit
    ],
    ids=["garbage", "truncated", "deeply-nested"],
)
def test_undecodable_requests_are_invalid_argument(
    hub: tuple[Sidecar, grpc.Channel], payload: bytes
) -> None:
    _, channel = hub
    raw = channel.unary_unary(
        f"/{SERVICE.full_name}/GetInstance",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as info:
        raw(payload, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid GetInstanceRequest" in (info.value.details() or "")


def test_a_ten_megabyte_input_is_served_and_a_bigger_one_is_resource_exhausted(
    hub: tuple[Sidecar, grpc.Channel],
) -> None:
    sidecar, channel = hub
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(sidecar.address, options=options) as big:
        start = big.unary_unary(
            f"/{SERVICE.full_name}/StartInstance",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=sdk_pb.CreateInstanceResponse.FromString,
        )
        request = sdk_pb.CreateInstanceRequest(instanceId="fuzz-10mb", name="quick")
        request.input.value = '"' + "x" * (10 << 20) + '"'
        assert start(request, timeout=30).instanceId == "fuzz-10mb"
        request.instanceId = "fuzz-20mb"
        request.input.value = "y" * (20 << 20)
        with pytest.raises(grpc.RpcError) as info:
            start(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    del channel


def test_after_the_fuzzing_the_store_is_consistent_and_still_runs_orchestrations(
    hub: tuple[Sidecar, grpc.Channel],
) -> None:
    sidecar, _ = hub
    if not sidecar.store.postgres:
        assert query_store(sidecar.store, "PRAGMA integrity_check") == [("ok",)]
    for table, parent in (
        ("history", "instances"),
        ("inbox", "instances"),
        ("activities", "instances"),
        ("entity_inbox", "entities"),
    ):
        [(orphans,)] = query_store(
            sidecar.store,
            f"SELECT COUNT(*) FROM {table} t WHERE NOT EXISTS "
            f"(SELECT 1 FROM {parent} p WHERE p.instance_id = t.instance_id)",
        )
        assert orphans == 0, f"{orphans} rows of {table} belong to no row of {parent}"
    statuses = {r[0] for r in query_store(sidecar.store, "SELECT DISTINCT status FROM instances")}
    assert statuses <= set(range(8))
    with sdk_worker(sidecar.address, [waiter, quick]):
        c = sdk_client(sidecar.address)
        instance_id = c.schedule_new_orchestration(quick)
        state = c.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None and state.runtime_status == client.OrchestrationStatus.COMPLETED
