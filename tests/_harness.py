"""A real dt-trio sidecar in a subprocess, and the official SDK's worker and client against it."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import _postgres
import pytest
from durabletask import client, worker

LISTENING = re.compile(r"server listening at (\S+):(\d+)(?:$|\")")  # text or JSON lines
DASHBOARD = re.compile(r"dashboard at (\S+?)(?:$|\")")
# The store the suite runs on (see conftest.py): sqlite, or postgres.
STORE = os.environ.get("DT_TRIO_TEST_STORE", "sqlite")


# On PostgreSQL, the leases of a sidecar the tests kill keep its work this long (seconds).
TEST_LEASE_TTL = 5.0


@dataclass(frozen=True)
class Store:
    """Where a test's task hub lives: `db` (an sqlite file, or a PostgreSQL address) and, on
    PostgreSQL, a `hub` of the test's own."""

    db: str
    hub: str = "default"
    lease_ttl: float = TEST_LEASE_TTL

    @property
    def postgres(self) -> bool:
        return self.db.startswith("postgresql://")

    def args(self) -> list[str]:
        """The command's arguments."""
        if not self.postgres:
            return ["--db", self.db]
        return ["--db", self.db, "--hub", self.hub, "--lease-ttl", str(self.lease_ttl)]

    def kwargs(self) -> dict[str, Any]:
        """`serve`'s and `open_task_hub`'s keywords."""
        if not self.postgres:
            return {"db": self.db}
        return {"db": self.db, "hub": self.hub, "lease_ttl": self.lease_ttl}


def query_store(store: Store, sql: str) -> list[tuple[Any, ...]]:
    """Rows of `sql` (plain SQL both stores understand, on the tables of `store`'s hub), read
    directly from the store (an sqlite file read-only, or the hub's schema)."""
    if store.postgres:
        import psycopg

        with psycopg.connect(store.db, options=f"-c search_path=dt_trio_{store.hub}") as conn:
            return conn.execute(sql.encode()).fetchall()
    import sqlite3

    db = sqlite3.connect(f"file:{store.db}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def _store_class() -> type[Any]:
    if STORE == "postgres":
        from dt_trio._store._postgres import PostgresBackend

        return PostgresBackend
    from dt_trio._store import SqliteBackend

    return SqliteBackend


# The suite's store class, for tests that make a store of their own (or subclass one): build
# it with `store_args()` first.
StoreClass = _store_class()


def store_args(tmp_path: pathlib.Path | None = None) -> tuple[str, ...]:
    """A new store's first arguments: "" (sqlite in memory; with `tmp_path`, a file there, for
    a store that outlives its store object), or the session's PostgreSQL server and a hub of
    its own."""
    if STORE == "postgres":
        return (os.environ[_postgres.ENV_SERVER], _postgres.new_hub())
    return (str(tmp_path / "hub.sqlite3") if tmp_path is not None else "",)


# The kinds of store the store tests run on: an sqlite file and memory, or PostgreSQL (with
# the commits made most as calls of the schema's functions, and every commit the general way).
STORE_KINDS = ["file", "memory"] if STORE == "sqlite" else ["postgres", "postgres-general"]


def store_factory(kind: str, tmp_path: pathlib.Path) -> Callable[..., Any]:
    """Stores of `kind` (see STORE_KINDS) on one place, not opened: each call makes a new
    store object there (as a new process would), with the given keywords (`listener`)."""
    if kind.startswith("postgres"):
        place = (os.environ[_postgres.ENV_SERVER], _postgres.new_hub())
        general = {"functions": False} if kind == "postgres-general" else {}
        return lambda **kw: StoreClass(*place, **general, **kw)
    place = (str(tmp_path / "hub.sqlite3") if kind == "file" else "",)
    return lambda **kw: StoreClass(*place, **kw)


async def cache_problems(store: Any) -> list[str]:
    """Where the store's cache of instances differs from the store (sqlite's; a PostgreSQL
    store keeps none): empty when it is coherent."""
    verify = getattr(store, "verify_cache", None)
    return [] if verify is None else list(await verify())


def a_store(tmp_path: pathlib.Path, name: str = "taskhub.sqlite3") -> Store:
    """A new task hub on the suite's store: the file `name` in `tmp_path`, or a hub of its
    own on the session's PostgreSQL server."""
    if STORE == "postgres":
        return Store(os.environ[_postgres.ENV_SERVER], _postgres.new_hub())
    return Store(str(tmp_path / name))


class Sidecar:
    """`python -m dt_trio` on an ephemeral port; stderr is drained into a log file. `db` is a
    path or address, or a `Store`."""

    def __init__(self, db: str | Store, log_path: pathlib.Path, *extra_args: str) -> None:
        self.store = db if isinstance(db, Store) else Store(db)
        self.db = self.store.db
        self.extra_args = list(extra_args)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ui_url = ""  # the dashboard's, when it serves one

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0, port: int = 0) -> Sidecar:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [*self.command(port), *self.extra_args],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        seen = len(self.log_text())
        while time.monotonic() < deadline:
            for line in self.log_text()[seen:].splitlines()[::-1]:
                match = LISTENING.search(line)
                if match:
                    self.port = int(match.group(2))
                    break
            for line in self.log_text()[seen:].splitlines()[::-1]:
                found = DASHBOARD.search(line)
                if found:
                    self.ui_url = found.group(1)
                    break
            if self.port and "activity-processor: waiting" in self.log_text()[seen:]:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"the sidecar exited early:\n{self.log_text()}")
            time.sleep(0.02)
        raise RuntimeError(f"the sidecar did not start in {timeout}s:\n{self.log_text()}")

    def command(self, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "dt_trio",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *self.store.args(),
            "--ui",
            "127.0.0.1:0",  # the dashboard on a port of its own (see `ui_url`)
        ]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.port = 0
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.port = 0

    def restart(self, port: int = 0) -> Sidecar:
        """Start again on the same store (and on `port`, e.g. the old one, if given)."""
        with open(self.log_path, "a") as f:
            f.write("\n--- restart ---\n")
        self.port = 0
        return self.start(port=port)


@contextlib.contextmanager
def running_sidecar(tmp_path: pathlib.Path, db: str | Store | None = None) -> Iterator[Sidecar]:
    sidecar = Sidecar(a_store(tmp_path) if db is None else db, tmp_path / "sidecar.log").start()
    try:
        yield sidecar
    finally:
        if sidecar.proc is not None and sidecar.proc.poll() is None:
            code = sidecar.stop()
            assert code == 0, f"sidecar exit code {code}:\n{sidecar.log_text()[-4000:]}"


@pytest.fixture
def sidecar(tmp_path: pathlib.Path) -> Iterator[Sidecar]:
    """A sidecar on a store of its own, stopped with SIGTERM (exit code 0) afterwards."""
    with running_sidecar(tmp_path) as s:
        yield s


@contextlib.contextmanager
def sdk_worker(
    address: str,
    orchestrators: list[Callable[..., Any]] = (),  # type: ignore[assignment]
    activities: list[Callable[..., Any]] = (),  # type: ignore[assignment]
    entities: list[Any] = (),  # type: ignore[assignment]
) -> Iterator[worker.TaskHubGrpcWorker]:
    w = worker.TaskHubGrpcWorker(host_address=address)
    for o in orchestrators:
        w.add_orchestrator(o)
    for a in activities:
        w.add_activity(a)
    for e in entities:
        w.add_entity(e)
    w.start()
    try:
        yield w
    finally:
        w.stop()


def sdk_client(address: str) -> client.TaskHubGrpcClient:
    return client.TaskHubGrpcClient(host_address=address)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll a side effect that has no event to wait on (another process's file, say)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


class Gate:
    """A thread-safe gate an activity can block on until the test opens it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def wait(self, timeout: float = 30.0) -> None:
        self.entered.set()
        self.opened.wait(timeout)


@contextlib.asynccontextmanager
async def running_processors(store: Any, executor: Any, **dispatch: Any) -> AsyncIterator[Any]:
    """An opened store's orchestration and activity processors on one dispatcher (owner "me",
    with `dispatch`'s options) running on `executor`, for the body; yields the HubClient that
    starts instances."""
    import trio

    from dt_trio._engine import ActivityProcessor, Dispatcher, HubClient, OrchestrationProcessor

    await store.open()
    dispatcher = Dispatcher(store, executor, "me", **dispatch)
    orchestrations = OrchestrationProcessor(dispatcher, store.listener)
    activities = ActivityProcessor(dispatcher, store.listener)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(orchestrations.run)
            await nursery.start(activities.run)
            yield HubClient(store, store.listener, dispatcher)
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


def fan_out_answer(request: Any, fan: int) -> Any:
    """A test orchestrator's answer to the step `request`: fan out to `fan` activities 'act',
    complete once all their results are in (only the new actions, as an SDK answers)."""
    from dt_trio._proto import orchestrator_service_pb2 as pb

    response = pb.OrchestratorResponse(instanceId=request.instanceId)
    events = [*request.pastEvents, *request.newEvents]
    if not any(e.HasField("taskScheduled") for e in events):
        for i in range(fan):
            response.actions.add(id=i).scheduleTask.name = "act"
    elif sum(e.HasField("taskCompleted") for e in events) == fan:
        done = response.actions.add(id=fan).completeOrchestration
        done.orchestrationStatus = pb.ORCHESTRATION_STATUS_COMPLETED
    return response


async def run_beside(client: Any, name: str, *tasks: Callable[[Any], Awaitable[None]]) -> Any:
    """Start orchestration `name` through the HubClient `client` with `tasks` (test workers,
    each given the nursery for tasks of its own) running beside it, started and waiting
    before it starts; its state once it ends (within 15 s)."""
    import trio
    import trio.testing

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            for task in tasks:
                nursery.start_soon(task, nursery)
            await trio.testing.wait_all_tasks_blocked()
            instance_id = await client.start(name)
            state = await client.wait(instance_id, lambda s: s.status.is_terminal)
            nursery.cancel_scope.cancel()
    assert state is not None
    return state


def commit_name(commit: Any, applied: Any) -> str | None:
    """What an applied commit did, in the engine tests' words: "create" (an instance), "result"
    (an activity's), either with "+step" when a step run ahead was committed with it, "step";
    None for anything else (a release, an event)."""
    from dt_trio._core._commit import CreateInstance, DeleteActivity, WriteStep

    if applied.alternative:
        commit = commit.otherwise
    kinds = {type(w) for w in commit.writes}
    stepped = "+step" if WriteStep in kinds else ""
    if CreateInstance in kinds:
        return "create" + stepped
    if DeleteActivity in kinds:
        return "result" + stepped
    return "step" if stepped else None


def commit_instance(commit: Any) -> str:
    """The instance a create, result or step commit is about."""
    from dt_trio._core._commit import CreateInstance, Send, WriteStep

    for write in commit.writes:
        if isinstance(write, WriteStep):
            return str(write.result.state.instance_id)
        if isinstance(write, CreateInstance):
            return str(write.state.instance_id)
        if isinstance(write, Send):
            return str(write.messages[0].target_instance_id)
    raise AssertionError(f"no instance in {commit}")
