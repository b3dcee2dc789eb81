"""Who may reach the sidecar: loopback by default, TLS or --insecure elsewhere, a shared token."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import grpc
import pytest
from _harness import Sidecar, running_sidecar, sdk_client, sdk_worker
from durabletask import client, task
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs

pytestmark = pytest.mark.store_independent


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


def self_signed(directory: pathlib.Path, name: str = "") -> tuple[pathlib.Path, pathlib.Path]:
    """A certificate for localhost and 127.0.0.1, and its key (as the README makes one)."""
    cert, key = directory / f"{name}cert.pem", directory / f"{name}key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
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
    return cert, key


def test_tls_serves_http2_over_tls(tmp_path: pathlib.Path) -> None:
    cert, key = self_signed(tmp_path)
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


def dt_trio_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dt_trio", *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--host", "999.1.1.1"], "--host 999.1.1.1 is not a valid IP address"),
        (["--host", "1.2.3"], "--host 1.2.3 is not a valid IP address"),
        (["--host", "no-such-host.invalid"], "--host no-such-host.invalid: cannot resolve"),
        (["--ui", "999.1.1.1:0"], "--ui 999.1.1.1 is not a valid IP address"),
    ],
)
def test_a_host_that_cannot_be_bound_is_named_as_such(flags: list[str], problem: str) -> None:
    out = dt_trio_command(*flags, "--port", "0", "--db", "")
    assert out.returncode == 2
    assert problem in out.stderr, out.stderr
    assert "reachable from other machines" not in out.stderr


def test_a_name_of_the_loopback_interface_needs_no_tls(tmp_path: pathlib.Path) -> None:
    sidecar = Sidecar("", tmp_path / "log.txt", "--host", "localhost").start()
    assert sidecar.stop() == 0


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    directory = tmp_path_factory.mktemp("pems")
    cert, key = self_signed(directory)
    _, other_key = self_signed(directory, "other-")
    garbage = directory / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    encrypted = directory / "encrypted-key.pem"
    subprocess.run(
        [
            "openssl",
            "pkey",
            "-in",
            str(key),
            "-aes256",
            "-passout",
            "pass:pw",
            "-out",
            str(encrypted),
        ],
        check=True,
        capture_output=True,
    )
    missing = directory / "missing.pem"
    return {
        "cert": cert,
        "key": key,
        "other_key": other_key,
        "garbage": garbage,
        "encrypted": encrypted,
        "missing": missing,
    }


@pytest.mark.parametrize(
    ("cert", "key", "problem"),
    [
        ("missing", "key", "cannot read the certificate chain {missing}: No such file"),
        ("cert", "missing", "cannot read the private key {missing}: No such file"),
        ("garbage", "key", "{garbage} is not a PEM certificate chain"),
        ("key", "key", "{key} is not a PEM certificate chain"),
        ("cert", "garbage", "{garbage} is not a PEM private key"),
        ("cert", "cert", "{cert} is not a PEM private key"),
        ("cert", "other_key", "the private key {other_key} does not match the certificate {cert}"),
        ("cert", "encrypted", "the private key {encrypted} is encrypted"),
    ],
)
def test_tls_files_that_cannot_serve_are_named_with_the_reason(
    pems: dict[str, pathlib.Path], cert: str, key: str, problem: str
) -> None:
    out = dt_trio_command(
        "--tls-cert", str(pems[cert]), "--tls-key", str(pems[key]), "--port", "0", "--db", ""
    )
    assert out.returncode == 2
    assert problem.format(**pems) in out.stderr, out.stderr
    assert "PEM lib" not in out.stderr and "Traceback" not in out.stderr


def test_debug_logging_never_shows_the_token(tmp_path: pathlib.Path) -> None:
    # (lower-case levels are accepted as well)
    sidecar = Sidecar("", tmp_path / "log.txt", "--log-level", "debug", "--token", "s3cret")
    sidecar.start()
    try:
        auth = [("authorization", "Bearer s3cret")]
        c = client.TaskHubGrpcClient(host_address=sidecar.address, metadata=auth)
        with sdk_worker_with_metadata(sidecar.address, auth):
            instance_id = c.schedule_new_orchestration(greet, input="friend")
            state = c.wait_for_orchestration_completion(instance_id, timeout=20)
        assert state is not None and json.loads(state.serialized_output) == "hi friend"
    finally:
        assert sidecar.stop() == 0
    log = sidecar.log_text()
    assert "s3cret" not in log
    assert "created orchestration" in log


def test_the_bearer_scheme_is_case_insensitive(tmp_path: pathlib.Path) -> None:
    sidecar = Sidecar("", tmp_path / "log.txt", "--token", "s3cret").start()
    try:
        with grpc.insecure_channel(sidecar.address) as channel:
            stub = stubs.TaskHubSidecarServiceStub(channel)
            for scheme in ("bearer", "BEARER", "bEaReR"):
                metadata = [("authorization", f"{scheme} s3cret")]
                response = stub.GetInstance(
                    pb.GetInstanceRequest(instanceId="x"), metadata=metadata
                )
                assert response.exists is False
            for wrong in ("Bearer S3CRET", "Basic s3cret", "Bearers3cret", "s3cret"):
                with pytest.raises(grpc.RpcError) as info:
                    stub.GetInstance(
                        pb.GetInstanceRequest(instanceId="x"), metadata=[("authorization", wrong)]
                    )
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert sidecar.stop() == 0


# What the README shows: the official SDK over TLS with a self-signed certificate and a token.
SDK_OVER_TLS = """
import json, os, sys
from durabletask import client, task, worker

def greet(ctx: task.OrchestrationContext, name: str) -> str:
    return f"hi {name}"

address = sys.argv[1]
metadata = [("authorization", f"Bearer {os.environ['DT_TRIO_TOKEN']}")]
w = worker.TaskHubGrpcWorker(host_address=address, secure_channel=True, metadata=metadata)
w.add_orchestrator(greet)
c = client.TaskHubGrpcClient(host_address=address, secure_channel=True, metadata=metadata)
instance_id = c.schedule_new_orchestration(greet, input="tls")
w.start()
state = c.wait_for_orchestration_completion(instance_id, timeout=20)
w.stop()
print(state.runtime_status.name, state.serialized_output)
"""


def test_the_sdk_reaches_a_tls_sidecar_with_a_self_signed_certificate_and_a_token(
    tmp_path: pathlib.Path,
) -> None:
    cert, key = self_signed(tmp_path)
    sidecar = Sidecar("", tmp_path / "log.txt", "--tls-cert", str(cert), "--tls-key", str(key))
    sidecar.extra_args += ["--token", "s3cret"]
    sidecar.start()
    try:
        env = dict(os.environ, GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=str(cert), DT_TRIO_TOKEN="s3cret")
        out = subprocess.run(
            [sys.executable, "-c", SDK_OVER_TLS, f"localhost:{sidecar.port}"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["COMPLETED", '"hi', 'tls"'], out.stdout
        # the same without the token: refused
        env["DT_TRIO_TOKEN"] = "wrong"
        out = subprocess.run(
            [sys.executable, "-c", SDK_OVER_TLS, f"localhost:{sidecar.port}"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert out.returncode != 0 and "UNAUTHENTICATED" in out.stderr, out.stderr
    finally:
        assert sidecar.stop() == 0


def test_instance_ids_cannot_forge_or_flood_log_lines(tmp_path: pathlib.Path) -> None:
    forged = "x\n2020-01-01 00:00:00,000 INFO dt_trio: forged\r\x1b[2J"
    huge = "y" * 100_000
    with running_sidecar(tmp_path) as sidecar, sdk_worker(sidecar.address, [greet]):
        c = sdk_client(sidecar.address)
        for instance_id in (forged, huge):
            c.schedule_new_orchestration(greet, input="id", instance_id=instance_id)
            state = c.wait_for_orchestration_completion(instance_id, timeout=20)
            assert state is not None and state.instance_id == instance_id  # stored as given
    log = sidecar.log_text()
    lines = log.splitlines()
    assert not [line for line in lines if line.startswith("2020-01-01")]
    assert "\x1b" not in log and "\r" not in log
    assert r"x\n2020-01-01 00:00:00,000 INFO dt_trio: forged\r\x1b[2J" in log  # escaped
    assert max(len(line) for line in lines) < 1000
    assert "y" * 100 in log  # (cut, not dropped)


def test_every_dt_trio_logger_escapes_and_cuts_what_it_logs() -> None:
    import importlib
    import logging
    import pkgutil

    import dt_trio

    for module in pkgutil.walk_packages(dt_trio.__path__, "dt_trio."):
        if module.name != "dt_trio.__main__":  # (that one runs the command)
            importlib.import_module(module.name)
    loggers = [
        logger
        for name, logger in logging.root.manager.loggerDict.items()
        if (name == "dt_trio" or name.startswith("dt_trio.")) and isinstance(logger, logging.Logger)
    ]
    assert len(loggers) >= 5
    for logger in loggers:
        record = logger.makeRecord(
            logger.name, logging.INFO, "f", 1, "%s|%s", ("a\nb", "c" * 300), None
        )
        assert logger.filter(record)
        assert record.getMessage() == "a\\nb|" + "c" * 200 + "...[100 more characters]", logger.name
