"""The dt-trio command as a user runs it, and dt_trio.serve as a script embeds it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from typing import Any

import pytest
import trio
from _harness import STORE_KINDS, Gate, Sidecar, Store, a_store, sdk_client, sdk_worker
from durabletask import task

import dt_trio

STARTUP_LINES = [
    "backend started: ",
    "server listening at 127.0.0.1:",
    "orchestration-processor: waiting for new work items...",
    "activity-processor: waiting for new work items...",
]


def in_order(text: str, fragments: list[str]) -> bool:
    position = 0
    for fragment in fragments:
        found = text.find(fragment, position)
        if found < 0:
            return False
        position = found + len(fragment)
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("db", [k for k in STORE_KINDS if k != "postgres-general"])
def test_command_logs_its_start_in_order_and_stops_cleanly(
    tmp_path: pathlib.Path, sig: int, db: str
) -> None:
    if db == "postgres":
        from psycopg.conninfo import conninfo_to_dict

        store = a_store(tmp_path)
        info = conninfo_to_dict(store.db)
        where = f"{info['host']}:{info['port']}/{info['dbname']}"
        # a password in the address is never logged
        store = dataclasses.replace(store, db=f"postgresql://{info['user']}:s3cret@{where}")
        expected = f"backend started: postgres::{where}#{store.hub}"
    else:
        store = Store(str(tmp_path / "hub.sqlite3") if db == "file" else "")
        expected = f"backend started: sqlite::{store.db or 'memory'}"
    sidecar = Sidecar(store, tmp_path / "log.txt").start()
    assert sidecar.stop(sig) == 0
    log = sidecar.log_text()
    assert in_order(log, [expected, *STARTUP_LINES[1:]]), log
    assert "Traceback" not in log and "s3cret" not in log
    if db == "file":
        assert pathlib.Path(store.db).exists()


@pytest.mark.store_independent
def test_module_and_console_script_share_the_arguments() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dt_trio", "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--host", "--port", "--db", "--log-level"):
        assert flag in out.stdout


@pytest.mark.store_independent
def test_a_bad_port_is_refused_with_a_message() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dt_trio", "--port", "70000"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "--port must be between 0 and 65535" in out.stderr


@pytest.mark.store_independent
def test_a_taken_port_is_refused_with_a_message(tmp_path: pathlib.Path) -> None:
    first = Sidecar("", tmp_path / "a.log").start()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "dt_trio", "--port", str(first.port), "--db", ""],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 1
        assert f"cannot start: [Errno 98] cannot listen on 127.0.0.1:{first.port}" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        assert first.stop() == 0


def greet(ctx: task.OrchestrationContext, name: str) -> str:
    return f"hi {name}"


async def test_serve_embeds_in_a_trio_program_with_keywords(tmp_path: pathlib.Path) -> None:
    store = a_store(tmp_path).kwargs()
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            lambda task_status: dt_trio.serve(
                host="127.0.0.1", port=0, **store, task_status=task_status
            )
        )
        address = f"{host}:{port}"

        def drive() -> str:
            with sdk_worker(address, [greet]):
                c = sdk_client(address)
                instance_id = c.schedule_new_orchestration(greet, input="trio")
                state = c.wait_for_orchestration_completion(instance_id, timeout=20)
                assert state is not None
                return str(state.serialized_output)

        assert json.loads(await trio.to_thread.run_sync(drive)) == "hi trio"
        nursery.cancel_scope.cancel()


@pytest.mark.store_independent
def test_trio_run_serve_works_with_the_defaults(tmp_path: pathlib.Path) -> None:
    # The defaults: 127.0.0.1:4001 and ./taskhub.sqlite3 in the working directory.
    code = (
        "import trio, dt_trio, signal, os, threading\n"
        "threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n"
        "try:\n    trio.run(dt_trio.serve)\nexcept KeyboardInterrupt:\n    print('stopped')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert "stopped" in out.stdout, out.stderr
    assert (tmp_path / "taskhub.sqlite3").exists()


def test_hello_cities_example_runs_against_the_sidecar(tmp_path: pathlib.Path) -> None:
    sidecar = Sidecar(a_store(tmp_path), tmp_path / "log.txt").start()
    try:
        example = pathlib.Path(__file__).parent.parent / "examples" / "hello_cities.py"
        out = subprocess.run(
            [sys.executable, str(example), "--address", sidecar.address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert 'COMPLETED ["Hello, Tokyo!", "Hello, Seattle!", "Hello, London!"]' in out.stdout
    finally:
        assert sidecar.stop() == 0


@pytest.mark.sqlite_only  # (several sidecars share a PostgreSQL hub)
def test_a_second_sidecar_on_the_same_store_is_refused_whatever_the_path_spelling(
    tmp_path: pathlib.Path,
) -> None:
    """One process per store, by the file's identity: the same path, a symlink and a hard
    link are all refused, leave no file behind, and the first sidecar's activity in flight
    is neither released nor run twice."""
    db = tmp_path / "hub.sqlite3"
    first = Sidecar(str(db), tmp_path / "first.log").start()
    (tmp_path / "link.sqlite3").symlink_to(db)
    spellings = [str(db), str(tmp_path / "link.sqlite3")]
    gate = Gate()
    runs: list[str] = []

    def held(ctx: task.ActivityContext, name: str) -> str:
        runs.append(name)
        gate.wait()
        return f"held {name}"

    def holds(ctx: task.OrchestrationContext, name: str) -> Any:
        return (yield ctx.call_activity(held, input=name))

    try:
        with sdk_worker(first.address, [holds], [held]):
            c = sdk_client(first.address)
            instance_id = c.schedule_new_orchestration(holds, input="first")
            assert gate.entered.wait(20)
            # the hard link is made while the first sidecar runs: it has its files open
            (tmp_path / "hard.sqlite3").hardlink_to(db)
            spellings.append(str(tmp_path / "hard.sqlite3"))
            files = sorted(p.name for p in tmp_path.iterdir())
            for path in spellings:
                out = subprocess.run(
                    [sys.executable, "-m", "dt_trio", "--port", "0", "--db", path, "--no-ui"],
                    capture_output=True,
                    text=True,
                    timeout=15,
                )
                assert out.returncode == 1, out.stderr
                assert f"cannot start: the store {path}" in out.stderr
                assert "is in use by another dt-trio process" in out.stderr
                assert "Traceback" not in out.stderr
                assert sorted(p.name for p in tmp_path.iterdir()) == files
            gate.opened.set()
            state = c.wait_for_orchestration_completion(instance_id, timeout=20)
            assert state is not None and json.loads(state.serialized_output) == "held first"
            assert runs == ["first"]
    finally:
        gate.opened.set()
        assert first.stop() == 0
    # the lock goes with the process, even after kill -9
    second = Sidecar(str(tmp_path / "link.sqlite3"), tmp_path / "second.log").start()
    second.kill()
    assert Sidecar(str(db), tmp_path / "third.log").start().stop() == 0


FOREIGN = {
    "tables": "PRAGMA user_version = 42; CREATE TABLE customers (id INTEGER PRIMARY KEY, "
    "name TEXT); CREATE TABLE orders (id INTEGER PRIMARY KEY, total REAL); "
    "INSERT INTO customers VALUES (1, 'ana');",
    "instances": "CREATE TABLE instances (id INTEGER PRIMARY KEY, host TEXT); "
    "INSERT INTO instances VALUES (1, 'web-1');",
}


@pytest.mark.store_independent
@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_another_programs_database_is_refused_and_left_unchanged(
    tmp_path: pathlib.Path, kind: str
) -> None:
    db = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.executescript(FOREIGN[kind])
        conn.commit()
    before = db.read_bytes()
    out = subprocess.run(
        [sys.executable, "-m", "dt_trio", "--port", "0", "--db", str(db), "--no-ui"],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert out.returncode == 1, out.stderr
    assert f"cannot start: {db} is an sqlite database of another program" in out.stderr
    assert "Traceback" not in out.stderr
    assert db.read_bytes() == before  # no table, user_version or journal mode changed
    assert [p.name for p in tmp_path.iterdir()] == ["other.db"]


@pytest.mark.store_independent
def test_the_message_size_limit_is_configurable(tmp_path: pathlib.Path) -> None:
    import grpc

    sidecar = Sidecar("", tmp_path / "log.txt", "--max-message-bytes", "2048").start()
    try:
        with sdk_worker(sidecar.address, [greet]):
            c = sdk_client(sidecar.address)
            with pytest.raises(grpc.RpcError) as info:
                c.schedule_new_orchestration(greet, input="x" * 10_000)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 2048 bytes" in info.value.details()
            instance_id = c.schedule_new_orchestration(greet, input="small")
            state = c.wait_for_orchestration_completion(instance_id, timeout=20)
            assert state is not None and json.loads(state.serialized_output) == "hi small"
    finally:
        assert sidecar.stop() == 0


@pytest.mark.store_independent
def test_an_unreachable_postgres_is_refused_with_a_message() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dt_trio",
            "--port",
            "0",
            "--db",
            "postgresql://u:s3cret@127.0.0.1:1/x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "cannot start: cannot open the store postgres::127.0.0.1:1/x:" in out.stderr
    assert "s3cret" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.store_independent
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hub", "orders"], "--hub is for a PostgreSQL --db"),
        (["--lease-ttl", "10"], "--lease-ttl is for a PostgreSQL --db"),
        (["--db", "postgresql://h/db", "--hub", "no-dash"], "invalid task hub name 'no-dash'"),
        (["--db", "postgresql://h/db", "--lease-ttl", "0.5"], "--lease-ttl must be between 1"),
    ],
)
def test_hub_options_that_cannot_apply_are_refused(args: list[str], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dt_trio", "--db", "", *args], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert message in out.stderr


def dt_trio_command(
    *args: str, cwd: pathlib.Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dt_trio", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )


@pytest.mark.store_independent
def test_a_second_signal_during_shutdown_is_logged_and_the_stop_stays_clean(
    tmp_path: pathlib.Path,
) -> None:
    # Two signals back to back (a terminal's Ctrl-C reaching the sidecar and the wrapper that
    # forwards it, say): the second arrives while the first one's shutdown runs.
    sidecar = Sidecar(str(tmp_path / "hub.sqlite3"), tmp_path / "log.txt").start()
    assert sidecar.proc is not None
    sidecar.proc.send_signal(signal.SIGINT)
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.stop() == 0
    log = sidecar.log_text()
    # (which of the two the process handles first is up to the OS)
    assert any(
        in_order(log, [f"received {first}, shutting down", f"received {then} while shutting down"])
        for first, then in (("SIGINT", "SIGTERM"), ("SIGTERM", "SIGINT"))
    ), log
    assert "Traceback" not in log
    # the stop was whole: the next start finds the store as a clean stop leaves it
    assert Sidecar(sidecar.db, tmp_path / "again.txt").start().stop() == 0


@pytest.mark.store_independent
@pytest.mark.parametrize("taken", ["--port", "--ui"])
def test_a_start_that_finds_its_port_taken_leaves_no_file_behind(
    tmp_path: pathlib.Path, taken: str
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        store_dir = tmp_path / "stores"
        store_dir.mkdir()
        ports = {"--port": "0", "--ui": "127.0.0.1:0"}
        ports[taken] = str(port) if taken == "--port" else f"127.0.0.1:{port}"
        out = dt_trio_command(
            *("--port", ports["--port"], "--ui", ports["--ui"]),
            *("--db", str(store_dir / "hub.sqlite3")),
        )
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert list(store_dir.iterdir()) == []


def _make_unwritable(directory: pathlib.Path) -> bool:
    """True if `directory` now refuses new files (for root too: chattr +i)."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        return True
    if shutil.which("chattr") is None:
        return False
    done = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, check=False)
    return done.returncode == 0


@pytest.mark.store_independent
def test_an_unwritable_directory_is_named_with_the_store(tmp_path: pathlib.Path) -> None:
    store_dir = tmp_path / "readonly"
    store_dir.mkdir()
    if not _make_unwritable(store_dir):
        pytest.skip("cannot make a directory unwritable for root here (no chattr +i)")
    try:
        db = store_dir / "hub.sqlite3"
        out = dt_trio_command("--port", "0", "--db", str(db))
    finally:
        subprocess.run(["chattr", "-i", str(store_dir)], capture_output=True, check=False)
        store_dir.chmod(0o700)
    assert out.returncode == 1
    assert f"cannot open the store sqlite::{db}" in out.stderr, out.stderr
    assert f"the directory {store_dir} is not writable" in out.stderr, out.stderr
    assert ".lock" not in out.stderr
    assert "Traceback" not in out.stderr
    assert list(store_dir.iterdir()) == []


@pytest.mark.store_independent
def test_a_store_in_a_missing_directory_is_named_with_it(tmp_path: pathlib.Path) -> None:
    db = tmp_path / "no-such-dir" / "hub.sqlite3"
    out = dt_trio_command("--port", "0", "--db", str(db))
    assert out.returncode == 1
    assert f"cannot open the store sqlite::{db}: the directory {db.parent} does not exist" in (
        out.stderr
    ), out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.store_independent
def test_json_log_lines_are_one_object_each_with_the_instance_id_as_a_key(
    tmp_path: pathlib.Path,
) -> None:
    from datetime import datetime

    def hello(ctx: task.OrchestrationContext, _: object) -> str:
        return "hi"

    sidecar = Sidecar("", tmp_path / "log.txt", "--log-format", "json").start()
    try:
        with sdk_worker(sidecar.address, [hello]):
            c = sdk_client(sidecar.address)
            c.schedule_new_orchestration(hello, instance_id="json-1")
            state = c.wait_for_orchestration_completion("json-1", timeout=30)
            assert state is not None
            # a step too large for a worker fails, with a warning about that instance
            c.schedule_new_orchestration(hello, input="x" * (5 << 20), instance_id="json-2")
            state = c.wait_for_orchestration_completion("json-2", fetch_payloads=False, timeout=30)
            assert state is not None and state.runtime_status.name == "FAILED"
    finally:
        assert sidecar.stop() == 0
    lines = [json.loads(line) for line in sidecar.log_text().splitlines()]
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
        assert datetime.fromisoformat(line["time"]).tzinfo is not None
    assert in_order("\n".join(line["message"] for line in lines), STARTUP_LINES)
    (created, _) = [line for line in lines if "created orchestration" in line["message"]]
    assert created["message"] == "json-1: created orchestration 'hello'"  # as in text
    assert (created["level"], created["logger"]) == ("INFO", "dt_trio._engine._client")
    assert (created["instance_id"], created["orchestration"]) == ("json-1", "hello")
    (ended,) = [line for line in lines if line.get("status") == "completed"]
    assert (ended["instance_id"], ended["orchestration"]) == ("json-1", "hello")
    (failed,) = [line for line in lines if line["level"] == "WARNING"]
    assert failed["instance_id"] == "json-2" and "json-2" in failed["message"], failed


@pytest.mark.store_independent
def test_the_text_log_format_stays_the_default(tmp_path: pathlib.Path) -> None:
    sidecar = Sidecar("", tmp_path / "log.txt").start()
    assert sidecar.stop() == 0
    assert not sidecar.log_text().startswith("{")
