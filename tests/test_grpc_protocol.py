"""The wire contract: protos/ is the official protocol, and dt_trio/_proto is generated from it."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from durabletask.internal import orchestrator_service_pb2 as sdk_pb
from google.protobuf import descriptor_pb2

from dt_trio._proto import orchestrator_service_pb2 as pb

pytestmark = pytest.mark.store_independent

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _normalised(descriptor: object) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor.CopyToProto(proto)  # type: ignore[attr-defined]
    proto.name = "orchestrator_service.proto"

    def strip(message: descriptor_pb2.DescriptorProto) -> None:
        for field in message.field:
            field.ClearField("json_name")
        for nested in message.nested_type:
            strip(nested)

    for message in proto.message_type:
        strip(message)
    return proto


def test_protocol_matches_the_official_sdk_field_for_field() -> None:
    ours = _normalised(pb.DESCRIPTOR)
    theirs = _normalised(sdk_pb.DESCRIPTOR)
    assert ours.package == "" == theirs.package
    assert [m.name for m in ours.message_type] == [m.name for m in theirs.message_type]
    for mine, official in zip(ours.message_type, theirs.message_type, strict=True):
        assert mine == official, f"message {mine.name} differs from the official protocol"
    assert list(ours.enum_type) == list(theirs.enum_type)
    assert list(ours.service) == list(theirs.service)
    assert ours == theirs


def test_service_has_all_29_rpcs_under_the_package_less_name() -> None:
    service = pb.DESCRIPTOR.services_by_name["TaskHubSidecarService"]
    assert service.full_name == "TaskHubSidecarService"
    assert len(service.methods) == 29


def test_generated_code_is_not_stale() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_messages_live_in_a_private_pool_beside_the_sdk() -> None:
    # Both modules are imported in this process: no duplicate-symbol clash, and the bytes agree.
    request = pb.OrchestratorRequest(instanceId="abc")
    request.newEvents.add().eventRaised.name = "go"
    parsed = sdk_pb.OrchestratorRequest.FromString(request.SerializeToString())
    assert parsed.instanceId == "abc"
    assert parsed.newEvents[0].eventRaised.name == "go"


def test_the_sidecar_serves_every_rpc_of_the_protocol() -> None:
    from dt_trio._grpc._service import SidecarService

    rpcs = {m.name for m in pb.DESCRIPTOR.services_by_name["TaskHubSidecarService"].methods}
    served = {name for name in rpcs if name in SidecarService.__dict__}
    assert served == rpcs, f"not served: {sorted(rpcs - served)}"
