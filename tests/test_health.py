"""The standard gRPC health checking protocol (grpc.health.v1.Health) on the sidecar's port,
called with grpcio's own health client, as Kubernetes' gRPC probes and grpc_health_probe do."""

from __future__ import annotations

import pathlib
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from _harness import Sidecar, sdk_client
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.store_independent

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


@pytest.fixture
def sidecar(tmp_path: pathlib.Path) -> Iterator[Sidecar]:
    sidecar = Sidecar(str(tmp_path / "hub.sqlite3"), tmp_path / "sidecar.log", "--token", "s3")
    yield sidecar.start()
    if sidecar.proc is not None and sidecar.proc.poll() is None:
        assert sidecar.stop() == 0


def check(stub: Any, service: str = "") -> int:
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(response.status)


def test_check_answers_for_the_server_and_the_sidecar_service_without_a_token(
    sidecar: Sidecar,
) -> None:
    with grpc.insecure_channel(sidecar.address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        assert check(stub) == SERVING
        assert check(stub, "TaskHubSidecarService") == SERVING
        with pytest.raises(grpc.RpcError) as info:
            check(stub, "no.such.Service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no.such.Service" in (info.value.details() or "")
        # The token guards everything else.
        with pytest.raises(grpc.RpcError) as info:
            sdk_client(sidecar.address).get_orchestration_state("x")
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # An unknown service is watched all the same (the protocol keeps the call open).
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert next(watch).status == SERVICE_UNKNOWN
        watch.cancel()


def test_watch_follows_a_store_fault_and_the_shutdown(sidecar: Sidecar) -> None:
    metadata = [("authorization", "Bearer s3")]
    with grpc.insecure_channel(sidecar.address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        sidecar_stub = stubs.TaskHubSidecarServiceStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == SERVING
        intruder = sqlite3.connect(sidecar.db, isolation_level=None)
        try:
            intruder.execute("BEGIN EXCLUSIVE")  # e.g. a backup tool holding a write lock
            start = pb.CreateInstanceRequest(name="echo", instanceId="blocked")
            with pytest.raises(grpc.RpcError) as info:
                sidecar_stub.StartInstance(start, metadata=metadata, timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert next(watch).status == NOT_SERVING
            assert check(stub) == NOT_SERVING
            assert check(stub, "TaskHubSidecarService") == NOT_SERVING
        finally:
            intruder.execute("ROLLBACK")
            intruder.close()
        # Nobody writes now: the sidecar's own trial write finds the store writable again.
        assert next(watch).status == SERVING
        assert check(stub) == SERVING
        assert "is writable again" in sidecar.log_text()

        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING  # told before the server stops
        with pytest.raises(grpc.RpcError):
            next(watch)
        assert sidecar.proc.wait(15) == 0


async def test_a_store_fault_turns_health_not_ready_until_a_trial_write_succeeds(
    tmp_path: pathlib.Path,
) -> None:
    """With nothing else writing, the hub's own trial write finds that the fault cleared."""
    import shutil

    import trio

    from dt_trio._engine import Signals
    from dt_trio._errors import StoreUnavailable
    from dt_trio._health import watch_store
    from dt_trio._store import SqliteBackend

    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed: cannot make the store read-only for root")
    signals = Signals()
    health = signals.health
    store = SqliteBackend(str(tmp_path / "hub.sqlite3"), listener=signals)
    await store.open()
    files = [store.path, f"{store.path}-wal"]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_store, health, store.try_write)
            await store.try_write()
            assert health.readiness.store_fault is None
            if not _immutable(files, True):
                pytest.skip("this file system does not support the immutable attribute")
            with pytest.raises(StoreUnavailable):
                await store.try_write()
            # Told before the write's caller hears of it.
            assert "cannot write" in (health.readiness.store_fault or "")
            assert _immutable(files, False)
            with trio.fail_after(10):
                await health.next_change()
            assert health.readiness.store_fault is None
            nursery.cancel_scope.cancel()
    finally:
        _immutable(files, False)
        await store.close()


def _immutable(paths: list[str], on: bool) -> bool:
    """chattr +i/-i: writes fail even for root and through open files."""
    flag = "+i" if on else "-i"
    return all(subprocess.run(["chattr", flag, p], check=False).returncode == 0 for p in paths)
