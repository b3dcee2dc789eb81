"""Who may reach the sidecar: loopback by default, TLS or --insecure elsewhere, a shared token."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import grpc
import pytest
from _harness import Sidecar
from durabletask import client, task
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs


def greet(ctx: task.OrchestrationContext, name: str) -> Any:
    return f"hi {name}"


def test_a_non_loopback_host_needs_tls_or_insecure() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dt_trio", "--host", "0.0.0.0", "--db", ""],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "--host 0.0.0.0 is reachable from other machines" in out.stderr
    assert "--tls-cert" in out.stderr and "--insecure" in out.stderr


def test_calls_without_the_token_are_unauthenticated(tmp_path: pathlib.Path) -> None:
    sidecar = Sidecar("", tmp_path / "log.txt", "--token", "s3cret").start()
    try:
        with grpc.insecure_channel(sidecar.address) as channel:
            stub = stubs.TaskHubSidecarServiceStub(channel)
            for metadata in (None, [("authorization", "Bearer wrong")]):
                with pytest.raises(grpc.RpcError) as info:
                    stub.GetInstance(pb.GetInstanceRequest(instanceId="x"), metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "authorization: Bearer" in info.value.details()
        auth = [("authorization", "Bearer s3cret")]
        c = client.TaskHubGrpcClient(host_address=sidecar.address, metadata=auth)
        with sdk_worker_with_metadata(sidecar.address, auth):
            instance_id = c.schedule_new_orchestration(greet, input="friend")
            state = c.wait_for_orchestration_completion(instance_id, timeout=20)
        assert state is not None and json.loads(state.serialized_output) == "hi friend"
    finally:
        assert sidecar.stop() == 0


def sdk_worker_with_metadata(address: str, metadata: list[tuple[str, str]]) -> Any:
    from durabletask import worker

    w = worker.TaskHubGrpcWorker(host_address=address, metadata=metadata)
    w.add_orchestrator(greet)

    class Running:
        def __enter__(self) -> None:
            w.start()

        def __exit__(self, *exc: object) -> None:
            w.stop()

    return Running()


def test_tls_serves_http2_over_tls(tmp_path: pathlib.Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    sidecar = Sidecar("", tmp_path / "log.txt", "--tls-cert", str(cert), "--tls-key", str(key))
    sidecar.start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{sidecar.port}", credentials) as channel:
            stub = stubs.TaskHubSidecarServiceStub(channel)
            response = stub.GetInstance(pb.GetInstanceRequest(instanceId="nobody"), timeout=10)
            assert response.exists is False
        with grpc.insecure_channel(sidecar.address) as plain:  # plaintext is refused
            with pytest.raises(grpc.RpcError) as info:
                stubs.TaskHubSidecarServiceStub(plain).GetInstance(
                    pb.GetInstanceRequest(instanceId="x"), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert sidecar.stop() == 0
