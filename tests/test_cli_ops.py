"""The operator commands (`dt-trio instances ...`, `dt-trio entities ...`) against a live sidecar
whose orchestrations the official SDK's worker runs; their JSON output is parsed and checked
against what the SDK's client (or the raw rpc) sees.

Most runs call the command's `main(argv)` in this process (the same code a shell runs, minus
the interpreter start); a few run it as a subprocess for exit codes and what --help imports.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from _harness import Sidecar, running_sidecar, sdk_client, sdk_worker, wait_until
from durabletask import client, entities, task
from durabletask.internal import orchestrator_service_pb2 as sdk_pb
from durabletask.internal import orchestrator_service_pb2_grpc as sdk_grpc
from google.protobuf import json_format

from dt_trio._entry import main
from dt_trio._ops import _entities as entities_commands
from dt_trio._ops import _instances as instances_commands
from dt_trio._ops._args import STATUS_NAMES

SdkStatus = client.OrchestrationStatus


# -- what the worker runs ------------------------------------------------------------------------


def say(ctx: task.ActivityContext, name: str) -> str:
    return f"Hello, {name}!"


def hello(ctx: task.OrchestrationContext, name: str) -> Any:
    return (yield ctx.call_activity(say, input=name))


def approval(ctx: task.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.wait_for_external_event("approve"))


def broken(ctx: task.OrchestrationContext, _: Any) -> Any:
    raise ValueError("bad input")


FRAGILE_BROKEN = threading.Event()


def fragile(ctx: task.ActivityContext, _: Any) -> str:
    if FRAGILE_BROKEN.is_set():
        raise RuntimeError("not yet")
    return "mended"


def flaky(ctx: task.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.call_activity(fragile))


def counter(ctx: entities.EntityContext, value: Any) -> Any:
    if ctx.operation == "add":
        ctx.set_state(ctx.get_state(int, 0) + value)
    elif ctx.operation == "delete":
        ctx.set_state(None)
    return None


@dataclass
class Hub:
    sidecar: Sidecar
    sdk: client.TaskHubGrpcClient

    @property
    def address(self) -> str:
        return self.sidecar.address


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    tmp = tmp_path_factory.mktemp("cli_ops")
    with (
        running_sidecar(tmp) as sidecar,
        sdk_worker(sidecar.address, [hello, approval, broken, flaky], [say, fragile], [counter]),
    ):
        yield Hub(sidecar, sdk_client(sidecar.address))


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)

    def lines(self) -> list[Any]:
        assert self.code == 0, self.err
        return [json.loads(line) for line in self.out.splitlines()]


def dt(command: str, address: str | None = None, stdin: str = "") -> Ran:
    """`dt-trio COMMAND --address ADDRESS` (COMMAND split as a shell would) in this process."""
    out, err = io.StringIO(), io.StringIO()
    args = shlex.split(command) + (["--address", address] if address else [])
    saved, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        sys.stdin = saved
    return Ran(code, out.getvalue(), err.getvalue())


def new_prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}-"


def rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(text)


def sdk_time(value: datetime) -> datetime:
    """The SDK's times are naive UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


# -- reading instances ---------------------------------------------------------------------------


def test_start_wait_show_list_and_history_agree_with_the_sdk(hub: Hub) -> None:
    i, a = new_prefix() + "hello", hub.address
    started = dt(f"""instances start hello --id {i} --input '"Tokyo"' --tag team=ops -o json""", a)
    assert started.json() == {"instanceId": i, "result": "started"}

    record = dt(f"instances wait {i} --timeout 30 -o json", a).json()
    state = hub.sdk.get_orchestration_state(i)
    assert state is not None and state.runtime_status == SdkStatus.COMPLETED
    assert record["instanceId"] == i and record["name"] == "hello"
    assert record["orchestrationStatus"] == "COMPLETED" == state.runtime_status.name
    assert record["input"] == "Tokyo" == json.loads(state.serialized_input)
    assert record["output"] == "Hello, Tokyo!" == json.loads(state.serialized_output)
    assert record["tags"] == {"team": "ops"}
    assert rfc3339(record["createdTimestamp"]) == sdk_time(state.created_at)
    assert rfc3339(record["lastUpdatedTimestamp"]) == sdk_time(state.last_updated_at)
    assert record["failureDetails"] is None and record["customStatus"] is None

    assert dt(f"instances show {i} -o json", a).json() == record
    (listed,) = dt(f"instances list --prefix {i} -o jsonl", a).lines()
    assert listed == {k: v for k, v in record.items() if k not in ("input", "output")}
    assert dt(f"instances list --prefix {i} --payloads -o json", a).json() == [record]

    table = dt(f"instances show {i}", a).out.splitlines()
    assert any(line.split() == ["orchestrationStatus", "COMPLETED"] for line in table)
    assert any(line.split(None, 1) == ["output", "Hello, Tokyo!"] for line in table)

    # the history: exactly the events StreamInstanceHistory returns, in its JSON form
    events = dt(f"instances history {i} -o json", a).json()
    with grpc.insecure_channel(a) as channel:
        chunks = sdk_grpc.TaskHubSidecarServiceStub(channel).StreamInstanceHistory(
            sdk_pb.StreamInstanceHistoryRequest(instanceId=i)
        )
        raw = [event for chunk in chunks for event in chunk.events]
    assert [json_format.ParseDict(e, sdk_pb.HistoryEvent()) for e in events] == raw
    kinds = [next(k for k in e if k not in ("eventId", "timestamp")) for e in events]
    assert "taskScheduled" in kinds and "executionCompleted" in kinds
    rows = dt(f"instances history {i}", a).out.splitlines()
    assert rows[0].split() == ["ID", "TIME", "EVENT", "NAME", "DETAILS"]
    assert len(rows) == 1 + len(raw)
    scheduled = next(row for row in rows if "taskScheduled" in row)
    assert " say " in scheduled and 'input="Tokyo"' in scheduled


def test_list_filters_narrow_the_instances(hub: Hub) -> None:
    p, a = new_prefix(), hub.address
    before = datetime.now(UTC) - timedelta(seconds=1)
    for name in ("hello", "broken", "approval"):
        hub.sdk.schedule_new_orchestration(name, input="x", instance_id=p + name)
    for name in ("hello", "broken"):
        hub.sdk.wait_for_orchestration_completion(p + name, timeout=30)
    hub.sdk.wait_for_orchestration_start(p + "approval", timeout=30)

    def ids(filters: str = "") -> list[str]:
        listed = dt(f"instances list --prefix {p} {filters} -o json", a).json()
        return sorted(record["instanceId"] for record in listed)

    assert ids() == [p + "approval", p + "broken", p + "hello"]
    assert ids("--status failed") == [p + "broken"]
    assert ids("--status RUNNING --status Failed") == [p + "approval", p + "broken"]
    assert ids("--name approval") == [p + "approval"]
    assert ids("--name approval --status COMPLETED") == []
    assert ids(f"--created-after {before.isoformat()}") == ids()
    assert ids(f"--created-after {(before + timedelta(hours=1)).isoformat()}") == []
    assert ids(f"--created-before {before.strftime('%Y-%m-%dT%H:%M:%S')}") == []
    assert len(ids("--limit 2")) == 2

    failed = dt(f"instances show {p}broken -o json", a).json()
    state = hub.sdk.get_orchestration_state(p + "broken")
    assert state is not None and state.failure_details is not None
    assert failed["orchestrationStatus"] == "FAILED"
    assert failed["failureDetails"]["errorMessage"] == state.failure_details.message
    assert "bad input" in failed["failureDetails"]["errorMessage"]

    # the table: a heading, then one row per instance, columns aligned
    lines = dt(f"instances list --prefix {p}", a).out.splitlines()
    heading, rows = lines[0], lines[1:]
    assert heading.split("  ")[0] == "INSTANCE ID" and len(rows) == 3
    for row in rows:
        assert row[heading.index("STATUS") :].split()[0] in ("COMPLETED", "FAILED", "RUNNING")
        assert row[heading.index("CREATED") :].startswith(str(datetime.now(UTC).year))


# -- acting on one instance ----------------------------------------------------------------------


def test_raise_event_completes_a_waiting_instance(hub: Hub) -> None:
    i, a = new_prefix() + "approval", hub.address
    assert dt(f"instances start approval --id {i}", a).code == 0
    assert dt(f"instances wait {i} --start --timeout 30", a).code == 0
    raised = dt(f"""instances raise-event {i} approve --input '{{"ok": true}}' -o json""", a)
    assert raised.json() == {"instanceId": i, "result": "event raised"}
    state = hub.sdk.wait_for_orchestration_completion(i, timeout=30)
    assert state is not None and json.loads(state.serialized_output) == {"ok": True}


def test_suspend_resume_and_terminate_one_instance(hub: Hub) -> None:
    i, a = new_prefix() + "approval", hub.address
    hub.sdk.schedule_new_orchestration(approval, instance_id=i)
    hub.sdk.wait_for_orchestration_start(i, timeout=30)

    def status() -> SdkStatus | None:
        state = hub.sdk.get_orchestration_state(i)
        return state.runtime_status if state else None

    suspended = dt(f"instances suspend {i} --reason lunch -o json", a).json()
    assert suspended == [{"instanceId": i, "result": "suspended", "error": None}]
    wait_until(lambda: status() == SdkStatus.SUSPENDED, what="suspended")
    assert dt(f"instances resume {i}", a).code == 0
    wait_until(lambda: status() == SdkStatus.RUNNING, what="running again")
    terminated = dt(f"""instances terminate {i} --result '"stopped"' -o json""", a).json()
    assert terminated == [{"instanceId": i, "result": "terminated", "error": None}]
    record = dt(f"instances wait {i} --timeout 30 -o json", a).json()
    assert record["orchestrationStatus"] == "TERMINATED" and record["output"] == "stopped"
    assert status() == SdkStatus.TERMINATED


def test_rewind_restart_and_purge(hub: Hub) -> None:
    i, a = new_prefix() + "flaky", hub.address
    FRAGILE_BROKEN.set()
    try:
        hub.sdk.schedule_new_orchestration(flaky, instance_id=i)
        failed = hub.sdk.wait_for_orchestration_completion(i, timeout=30)
        assert failed is not None and failed.runtime_status == SdkStatus.FAILED
    finally:
        FRAGILE_BROKEN.clear()
    assert dt(f"instances rewind {i} --reason fixed -o json", a).json()[0]["result"] == "rewound"
    state = hub.sdk.wait_for_orchestration_completion(i, timeout=30)
    assert state is not None and json.loads(state.serialized_output) == "mended"

    (again,) = dt(f"instances restart {i} --new-id -o json", a).json()
    new_id = again["restartedInstanceId"]
    assert again["result"] == "restarted" and new_id != i
    rerun = hub.sdk.wait_for_orchestration_completion(new_id, timeout=30)
    assert rerun is not None and json.loads(rerun.serialized_output) == "mended"
    (same,) = dt(f"instances restart {i} -o json", a).json()
    assert same["restartedInstanceId"] == i
    assert hub.sdk.wait_for_orchestration_completion(i, timeout=30) is not None

    purged = dt(f"instances purge {i} {new_id} -o json", a).json()
    assert [(r["instanceId"], r["deletedInstanceCount"]) for r in purged] == [(i, 1), (new_id, 1)]
    assert hub.sdk.get_orchestration_state(i) is None
    assert hub.sdk.get_orchestration_state(new_id) is None


# -- acting on everything a filter matches -------------------------------------------------------


def test_bulk_terminate_and_purge_by_filter(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    p, a = new_prefix(), hub.address
    monkeypatch.setattr(instances_commands, "PAGE_SIZE", 7)  # so that the matches come in pages
    waiting = [f"{p}w{i:02}" for i in range(30)]
    for instance_id in waiting:
        hub.sdk.schedule_new_orchestration(approval, instance_id=instance_id)
    finished = hub.sdk.schedule_new_orchestration(hello, input="x", instance_id=p + "hello")
    hub.sdk.wait_for_orchestration_completion(finished, timeout=30)
    for instance_id in waiting:
        hub.sdk.wait_for_orchestration_start(instance_id, timeout=30)

    # the name is matched by the command itself (QueryInstances has no name filter)
    done = dt(f"instances terminate --prefix {p} --name approval --yes -o json", a)
    records = done.json()
    assert sorted(r["instanceId"] for r in records) == waiting
    assert {r["result"] for r in records} == {"terminated"}
    assert "terminate: 30/30" in done.err  # progress on stderr
    for instance_id in waiting:
        state = hub.sdk.wait_for_orchestration_completion(instance_id, timeout=30)
        assert state is not None and state.runtime_status == SdkStatus.TERMINATED

    declined = dt(f"instances purge --prefix {p} --status terminated", a, stdin="n\n")
    assert declined.code == 1
    assert f"purge 30 instances matching --status TERMINATED --prefix {p}? [y/N]" in declined.err
    assert "nothing was done" in declined.err
    assert hub.sdk.get_orchestration_state(waiting[0]) is not None

    purged = dt(f"instances purge --prefix {p} --status terminated", a, stdin="y\n")
    assert purged.code == 0, purged.err
    assert all(hub.sdk.get_orchestration_state(i) is None for i in waiting)
    rows = purged.out.splitlines()
    assert rows[0].split() == ["INSTANCE", "ID", "RESULT", "DELETED"] and len(rows) == 31
    remaining = dt(f"instances list --prefix {p} -o json", a).json()
    assert [r["instanceId"] for r in remaining] == [p + "hello"]

    nothing = dt(f"instances terminate --prefix {p}none --yes", a)
    assert nothing.code == 0 and "no instance matches --prefix" in nothing.err


# -- entities ------------------------------------------------------------------------------------


def test_entities_signal_show_list_and_clean(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    key, a = new_prefix() + "c", hub.address
    for amount in (5, 37):
        signaled = dt(f"entities signal counter@{key} add --input {amount} -o json", a).json()
        assert signaled == {
            "instanceId": f"@counter@{key}",
            "operation": "add",
            "result": "signaled",
        }
    assert dt(f"entities signal @counter@{key}b add --input 1", a).code == 0

    def state(key: str) -> Any:
        metadata = hub.sdk.get_entity(entities.EntityInstanceId("counter", key))
        return json.loads(metadata.get_state()) if metadata else None

    wait_until(lambda: state(key) == 42 and state(key + "b") == 1, what="the signals applied")
    shown = dt(f"entities show @counter@{key} -o json", a).json()
    metadata = hub.sdk.get_entity(entities.EntityInstanceId("counter", key))
    assert metadata is not None
    assert shown["instanceId"] == f"@counter@{key}" and shown["serializedState"] == 42
    assert rfc3339(shown["lastModifiedTime"]) == sdk_time(metadata.last_modified)
    assert shown["backlogQueueSize"] == 0 and shown["lockedBy"] is None

    monkeypatch.setattr(entities_commands, "PAGE_SIZE", 1)  # so that the listing pages
    listed = dt(f"entities list --prefix counter@{key} -o json", a).json()
    by_id = {record["instanceId"]: record for record in listed}
    assert sorted(by_id) == [f"@counter@{key}", f"@counter@{key}b"]
    assert by_id[f"@counter@{key}"] == shown and by_id[f"@counter@{key}b"]["serializedState"] == 1
    assert len(dt(f"entities list --prefix counter@{key} --limit 1 -o jsonl", a).lines()) == 1
    table = dt(f"entities list --prefix counter@{key}", a).out.splitlines()
    assert table[0].split() == "ENTITY ID LAST MODIFIED LOCKED BY BACKLOG STATE".split()
    assert sorted(row.split()[-1] for row in table[1:]) == ["1", "42"]

    cleaned = dt("entities clean -o json", a).json()
    assert set(cleaned) == {"emptyEntitiesRemoved", "orphanedLocksReleased"}
    assert all(isinstance(v, int) and v >= 0 for v in cleaned.values())


# -- failures ------------------------------------------------------------------------------------


def test_errors_of_the_sidecar_exit_1_with_status_and_message(hub: Hub) -> None:
    p, a = new_prefix(), hub.address
    missing = dt(f"instances show {p}nobody", a)
    assert missing.code == 1 and missing.out == ""
    assert f"NOT_FOUND: no orchestration instance with id '{p}nobody'" in missing.err

    hub.sdk.schedule_new_orchestration(approval, instance_id=p + "w")
    hub.sdk.wait_for_orchestration_start(p + "w", timeout=30)
    taken = dt(f"instances start approval --id {p}w", a)
    assert taken.code == 1 and "ALREADY_EXISTS: " in taken.err and p + "w" in taken.err
    rewind = dt(f"instances rewind {p}w", a)
    assert rewind.code == 1 and "FAILED_PRECONDITION: " in rewind.err
    late = dt(f"instances wait {p}w --timeout 0.2", a)
    assert late.code == 1
    assert f"DEADLINE_EXCEEDED: instance '{p}w' did not finish within 0.2 s" in late.err

    # one bad id among good ones: the good ones are done, the exit status says one failed
    mixed = dt(f"instances terminate {p}w {p}nobody -o json", a)
    assert mixed.code == 1
    records = json.loads(mixed.out)
    assert records[0] == {"instanceId": p + "w", "result": "terminated", "error": None}
    assert records[1]["result"] == "failed" and records[1]["error"]["code"] == "NOT_FOUND"
    assert f"{p}nobody: NOT_FOUND: " in mixed.err
    assert hub.sdk.wait_for_orchestration_completion(p + "w", timeout=30) is not None

    no_entity = dt(f"entities show counter@{p}", a)
    assert no_entity.code == 1 and f"NOT_FOUND: no entity with id '@counter@{p}'" in no_entity.err

    with contextlib.closing(socket.socket()) as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    down = dt("instances list", f"127.0.0.1:{port}")
    assert down.code == 1 and f"UNAVAILABLE: cannot talk to 127.0.0.1:{port}" in down.err


@pytest.mark.store_independent
@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("instances list --status bogus", "'bogus' is not a status"),
        ("instances list --created-after yesterday", "is not an ISO 8601 time"),
        ("instances terminate", "give instance ids, or a filter"),
        ("instances purge x --status FAILED", "give instance ids or a filter, not both"),
        ("instances show", "the following arguments are required: ID"),
        ("instances list --address nowhere", "--address 'nowhere' is not HOST:PORT"),
        ("instances list --ca-cert /no/such.pem", "cannot use --ca-cert /no/such.pem"),
        ("instances list --limit 0", "'0' is not a positive whole number"),
        ("instances start x --tag novalue", "'novalue' is not KEY=VALUE"),
        ("entities frob", "invalid choice: 'frob'"),
    ],
)
def test_usage_errors_exit_2(command: str, message: str) -> None:
    ran = dt(command)
    assert ran.code == 2 and message in ran.err and ran.out == ""


@pytest.mark.store_independent
def test_status_names_are_the_protocol_s() -> None:
    from dt_trio._proto import orchestrator_service_pb2 as pb

    names = [name.removeprefix("ORCHESTRATION_STATUS_") for name in pb.OrchestrationStatus.keys()]
    assert tuple(names) == STATUS_NAMES


# -- as a user runs it ---------------------------------------------------------------------------


def test_the_command_in_a_shell(hub: Hub) -> None:
    def shell(command: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *shlex.split(command)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )

    missing = shell("-m dt_trio instances show nobody", DT_TRIO_ADDRESS=hub.address)
    assert missing.returncode == 1, missing.stderr
    assert "NOT_FOUND: no orchestration instance with id 'nobody'" in missing.stderr
    assert "Traceback" not in missing.stderr
    usage = shell("-m dt_trio instances list --status bogus")
    assert usage.returncode == 2 and "'bogus' is not a status" in usage.stderr

    # --help loads neither trio nor protobuf (nor the engine): it is quick
    for command in ("instances --help", "instances terminate --help", "entities --help"):
        shown = shell(f"-X importtime -m dt_trio {command}")
        assert shown.returncode == 0 and "usage: dt-trio" in shown.stdout
        imported = {line.split("|")[-1].strip() for line in shown.stderr.splitlines()}
        assert not {"trio", "google.protobuf", "purerpc", "dt_trio._hub"} & imported
    listed = shell("-m dt_trio instances --help").stdout
    for command in (
        "list show history start wait raise-event terminate suspend resume rewind restart purge"
    ).split():
        assert command in listed
    assert "dt-trio instances --help" in shell("-m dt_trio --help").stdout


@pytest.mark.store_independent
def test_every_public_name_still_imports() -> None:
    import importlib

    import dt_trio

    homes = [importlib.import_module(home) for home in dt_trio._HOMES]
    for name in dt_trio.__all__:
        value = getattr(dt_trio, name)
        # the lazy lookup takes the first home that has the name: no other may mean another thing
        assert all(getattr(home, name, value) is value for home in homes), name


# -- TLS and a token -----------------------------------------------------------------------------


@pytest.mark.store_independent
def test_tls_and_token(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = (
        "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
        f"-addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout {key} -out {cert}"
    )
    subprocess.run(shlex.split(openssl), check=True, capture_output=True)
    tls_args = ("--tls-cert", str(cert), "--tls-key", str(key), "--token", "s3cret")
    sidecar = Sidecar("", tmp_path / "log.txt", *tls_args).start()
    try:
        port = sidecar.port
        command = f"instances start hello --id secure --ca-cert {cert} --token s3cret -o json"
        started = dt(command, f"localhost:{port}")
        assert started.json()["instanceId"] == "secure"
        # the same from the environment: https:// means TLS, SSL_CERT_FILE trusts the cert
        monkeypatch.setenv("DT_TRIO_ADDRESS", f"https://localhost:{port}")
        monkeypatch.setenv("DT_TRIO_TOKEN", "s3cret")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        shown = dt("instances show secure -o json").json()
        assert shown["orchestrationStatus"] == "PENDING" and shown["name"] == "hello"
        monkeypatch.delenv("DT_TRIO_TOKEN")
        refused = dt("instances show secure")
        assert refused.code == 1 and "UNAUTHENTICATED: " in refused.err
        # plaintext to a TLS port: the sidecar drops the connection, which purerpc alone would
        # wait on for ever (hence a process with a timeout)
        plain = subprocess.run(
            [sys.executable, "-m", "dt_trio", "instances", "show", "secure"],
            env={**os.environ, "DT_TRIO_ADDRESS": f"127.0.0.1:{port}", "DT_TRIO_TOKEN": "s3cret"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert plain.returncode == 1 and "UNAVAILABLE: " in plain.stderr and "--tls" in plain.stderr
        monkeypatch.delenv("SSL_CERT_FILE")
        untrusted = dt("instances show secure --tls --token s3cret", f"localhost:{port}")
        assert untrusted.code == 1 and "UNAVAILABLE: " in untrusted.err
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.err
    finally:
        assert sidecar.stop() == 0
