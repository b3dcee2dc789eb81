"""/metrics, /healthz and /readyz: scraped over HTTP from a real sidecar (or hub) and parsed with
prometheus-client's own parser, around workloads the official SDK (or the local API) drives."""

from __future__ import annotations

import functools
import pathlib
import re
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import trio
from _harness import Gate, Sidecar, a_store, running_sidecar, sdk_client, sdk_worker, wait_until
from durabletask import client, task, worker
from durabletask.internal import orchestrator_service_pb2 as pb
from durabletask.internal import orchestrator_service_pb2_grpc as stubs
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import dt_trio

OrchestrationStatus = client.OrchestrationStatus
METRICS_AT = re.compile(r"metrics at (\S+?)(?:$|\")", re.MULTILINE)
DASHBOARD_AT = re.compile(r"dashboard at (\S+?)(?:$|\")", re.MULTILINE)


# -- scraping --------------------------------------------------------------------------------


class Scrape:
    """One scrape of /metrics, parsed: every sample by its name and labels."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in self.families.values():
            for sample in family.samples:
                self.samples[sample.name, frozenset(sample.labels.items())] = sample.value

    def get(self, metric: str, /, **labels: str) -> float:
        """The sample's value; 0 for a labelled series not seen yet."""
        return self.samples.get((metric, frozenset(labels.items())), 0.0)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(base: str) -> Scrape:
    status, text = get(base + "/metrics")
    assert status == 200, text
    return Scrape(text)


# -- the workload ------------------------------------------------------------------------------


def say_hello(ctx: task.ActivityContext, city: str) -> str:
    return f"Hello, {city}!"


def explode(ctx: task.ActivityContext, message: str) -> None:
    raise ValueError(message)


def hello_cities(ctx: task.OrchestrationContext, _: Any) -> Any:
    out = []
    for city in ("Tokyo", "Seattle", "London"):
        out.append((yield ctx.call_activity(say_hello, input=city)))
    return out


def fails(ctx: task.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.call_activity(explode, input="boom"))


def waits(ctx: task.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.wait_for_external_event("go"))


def parent(ctx: task.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.call_sub_orchestrator(hello_cities, instance_id=f"{ctx.instance_id}-kid"))


def test_the_counters_move_by_exactly_the_workload(tmp_path: pathlib.Path) -> None:
    with (
        running_sidecar(tmp_path) as sidecar,
        sdk_worker(sidecar.address, [hello_cities, fails, waits, parent], [say_hello, explode]),
    ):
        c = sdk_client(sidecar.address)
        wait_until(lambda: scrape(sidecar.ui_url).get("dt_trio_workers_connected") == 1)
        before = scrape(sidecar.ui_url)

        ids = [c.schedule_new_orchestration(hello_cities) for _ in range(5)]
        for instance_id in ids:
            state = c.wait_for_orchestration_completion(instance_id, timeout=30)
            assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
        failing = c.schedule_new_orchestration(fails)
        state = c.wait_for_orchestration_completion(failing, timeout=30)
        assert state is not None and state.runtime_status == OrchestrationStatus.FAILED
        waiting = c.schedule_new_orchestration(waits)
        c.wait_for_orchestration_start(waiting, timeout=30)
        c.terminate_orchestration(waiting, output="stopped")
        state = c.wait_for_orchestration_completion(waiting, timeout=30)
        assert state is not None and state.runtime_status == OrchestrationStatus.TERMINATED
        with_child = c.schedule_new_orchestration(parent)
        state = c.wait_for_orchestration_completion(with_child, timeout=30)
        assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED

        # An activity is counted once its result is committed, which the orchestration's
        # completion follows by a worker's round trip, at the latest.
        ran = "dt_trio_activities_total"
        wait_until(
            lambda: (
                scrape(sidecar.ui_url).get(ran, name="say_hello", outcome="completed")
                == before.get(ran, name="say_hello", outcome="completed") + 18
            )
        )
        after = scrape(sidecar.ui_url)

    def moved(metric: str, /, **labels: str) -> float:
        return after.get(metric, **labels) - before.get(metric, **labels)

    started = "dt_trio_orchestrations_started_total"
    ended = "dt_trio_orchestrations_ended_total"
    assert moved(started, name="hello_cities") == 6  # 5, and the child
    assert moved(started, name="fails") == 1
    assert moved(started, name="waits") == 1
    assert moved(started, name="parent") == 1
    assert moved(ended, name="hello_cities", status="completed") == 6
    assert moved(ended, name="parent", status="completed") == 1
    assert moved(ended, name="fails", status="failed") == 1
    assert moved(ended, name="waits", status="terminated") == 1
    for name in ("hello_cities", "fails", "waits", "parent"):
        for status in ("completed", "failed", "terminated"):
            if (name, status) not in {
                ("hello_cities", "completed"),
                ("parent", "completed"),
                ("fails", "failed"),
                ("waits", "terminated"),
            }:
                assert moved(ended, name=name, status=status) == 0, (name, status)
    assert moved(ran, name="say_hello", outcome="completed") == 18
    assert moved(ran, name="say_hello", outcome="failed") == 0
    assert moved(ran, name="explode", outcome="failed") == 1
    assert moved(ran, name="explode", outcome="completed") == 0
    duration = "dt_trio_activity_duration_seconds"
    assert moved(duration + "_count", name="say_hello") == 18
    assert moved(duration + "_bucket", name="say_hello", le="+Inf") == 18
    assert moved(duration + "_sum", name="say_hello") > 0
    for kind in ("orchestration", "activity", "entity"):
        assert moved("dt_trio_redeliveries_total", kind=kind) == 0
        assert moved("dt_trio_poison_failures_total", kind=kind) == 0
    # Every commit went through the store's writer: at least one per instance created.
    commits = moved("dt_trio_store_commit_seconds_count")
    assert commits >= 13
    assert moved("dt_trio_store_commit_writes_sum") >= commits
    assert after.get("dt_trio_ready") == 1
    assert after.get("dt_trio_store_fault") == 0
    assert after.families["dt_trio_orchestrations_started"].type == "counter"
    assert after.families["dt_trio_activity_duration_seconds"].type == "histogram"
    assert after.families["dt_trio_work_items_waiting"].type == "gauge"


def test_work_waiting_for_a_worker_and_the_leases_held_are_shown_at_scrape_time(
    sidecar: Sidecar,
) -> None:
    gate = Gate()

    def blocks(ctx: task.ActivityContext, n: int) -> int:
        if not gate.entered.is_set():  # the first to run (the worker runs one at a time)
            gate.wait()
        return n

    def two(ctx: task.OrchestrationContext, _: Any) -> Any:
        return (yield task.when_all([ctx.call_activity(blocks, input=n) for n in range(2)]))

    # One activity at a time: the second waits in the sidecar for the worker to take it.
    w = worker.TaskHubGrpcWorker(
        host_address=sidecar.address,
        concurrency_options=worker.ConcurrencyOptions(maximum_concurrent_activity_work_items=1),
    )
    w.add_orchestrator(two)
    w.add_activity(blocks)
    w.start()
    try:
        c = sdk_client(sidecar.address)
        instance_id = c.schedule_new_orchestration(two)
        assert gate.entered.wait(30)
        wait_until(
            lambda: bool(scrape(sidecar.ui_url).get("dt_trio_work_items_waiting", kind="activity"))
        )
        during = scrape(sidecar.ui_url)
        assert during.get("dt_trio_work_items_waiting", kind="activity") == 1
        assert during.get("dt_trio_oldest_work_item_age_seconds", kind="activity") > 0
        assert during.get("dt_trio_work_items_waiting", kind="orchestration") == 0
        assert during.get("dt_trio_oldest_work_item_age_seconds", kind="orchestration") == 0
        assert during.get("dt_trio_leases_held", kind="activity") == 2
        assert during.get("dt_trio_workers_connected") == 1
        gate.opened.set()
        state = c.wait_for_orchestration_completion(instance_id, timeout=30)
        assert state is not None and state.runtime_status == OrchestrationStatus.COMPLETED
        wait_until(lambda: scrape(sidecar.ui_url).get("dt_trio_leases_held", kind="activity") == 0)
        after = scrape(sidecar.ui_url)
        assert after.get("dt_trio_work_items_waiting", kind="activity") == 0
        assert after.get("dt_trio_oldest_work_item_age_seconds", kind="activity") == 0
    finally:
        gate.opened.set()
        w.stop()
    wait_until(lambda: scrape(sidecar.ui_url).get("dt_trio_workers_connected") == 0)


@pytest.fixture
def sidecar(tmp_path: pathlib.Path) -> Iterator[Sidecar]:
    with running_sidecar(tmp_path) as s:
        yield s


# -- where they are served, and to whom --------------------------------------------------------


def test_the_probes_need_no_token_on_the_dashboard_nor_on_a_port_of_their_own(
    tmp_path: pathlib.Path,
) -> None:
    sidecar = Sidecar(
        a_store(tmp_path), tmp_path / "sidecar.log", "--token", "s3", "--metrics", "127.0.0.1:0"
    ).start()
    try:
        found = METRICS_AT.search(sidecar.log_text())
        assert found, sidecar.log_text()
        alone = found.group(1)
        assert alone != sidecar.ui_url
        for base in (sidecar.ui_url, alone):
            assert get(base + "/healthz") == (200, "ok\n")
            assert get(base + "/readyz") == (200, "ready\n")
            assert scrape(base).get("dt_trio_ready") == 1
        # The rest of the dashboard still wants the token; the port of the probes has nothing
        # else to show.
        assert get(sidecar.ui_url + "/api/instances")[0] == 401
        bearer = {"Authorization": "Bearer s3"}
        assert get(sidecar.ui_url + "/api/instances", bearer)[0] == 200
        assert get(alone + "/api/instances", bearer)[0] == 404
        # On loopback, a request must name loopback (a page of another site whose name was
        # pointed at 127.0.0.1 is refused), as on the dashboard.
        assert get(alone + "/metrics", {"Host": "evil.example:80"})[0] == 421
    finally:
        assert sidecar.stop() == 0


@pytest.mark.store_independent
def test_metrics_off_loopback_need_tls_or_insecure() -> None:
    from dt_trio._cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--metrics", "0.0.0.0:9100"])
    assert parse_args(["--metrics", "0.0.0.0:9100", "--insecure"]).metrics == "0.0.0.0:9100"
    assert parse_args(["--metrics", "127.0.0.1:0"]).metrics == "127.0.0.1:0"
    with pytest.raises(SystemExit):
        parse_args(["--metrics", "nowhere"])


# -- readiness -----------------------------------------------------------------------------


def _watch(channel: grpc.Channel) -> Iterator[int]:
    stub: Any = health_pb2_grpc.HealthStub(channel)
    for response in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60):
        yield int(response.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.sqlite_only
def test_readyz_is_503_while_the_store_cannot_write(tmp_path: pathlib.Path) -> None:
    sidecar = Sidecar(str(tmp_path / "hub.sqlite3"), tmp_path / "sidecar.log").start()
    try:
        with grpc.insecure_channel(sidecar.address) as channel:
            watch = _watch(channel)
            assert next(watch) == SERVING
            intruder = sqlite3.connect(sidecar.db, isolation_level=None)
            try:
                intruder.execute("BEGIN EXCLUSIVE")  # e.g. a backup tool holding a write lock
                _start_refused(channel)
                assert next(watch) == NOT_SERVING
                _assert_not_ready(sidecar.ui_url, "cannot write")
            finally:
                intruder.execute("ROLLBACK")
                intruder.close()
            # The sidecar's own trial write finds the store writable again.
            assert next(watch) == SERVING
            _assert_ready(sidecar.ui_url)
    finally:
        assert sidecar.stop() == 0


@pytest.mark.postgres_only
def test_readyz_is_503_while_postgres_is_down(tmp_path: pathlib.Path) -> None:
    import _postgres
    from _harness import Store

    with _postgres.cluster() as server:
        store = Store(server.address, _postgres.new_hub())
        sidecar = Sidecar(store, tmp_path / "sidecar.log").start()
        try:
            with grpc.insecure_channel(sidecar.address) as channel:
                watch = _watch(channel)
                assert next(watch) == SERVING
                server.kill()
                _start_refused(channel)
                assert next(watch) == NOT_SERVING
                _assert_not_ready(sidecar.ui_url, "cannot be used")
                server.start()
                assert next(watch) == SERVING
                _assert_ready(sidecar.ui_url)
        finally:
            assert sidecar.stop() == 0


def _start_refused(channel: grpc.Channel) -> None:
    """A start the store cannot take: UNAVAILABLE (and the hub told of the fault first)."""
    start = pb.CreateInstanceRequest(name="echo", instanceId="blocked")
    with pytest.raises(grpc.RpcError) as info:
        stubs.TaskHubSidecarServiceStub(channel).StartInstance(start, timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def _assert_not_ready(base: str, why: str) -> None:
    status, body = get(base + "/readyz")
    assert status == 503
    assert body.startswith("not ready: ") and why in body, body
    assert get(base + "/healthz") == (200, "ok\n")  # the process serves all the same
    metrics = scrape(base)
    assert metrics.get("dt_trio_ready") == 0
    assert metrics.get("dt_trio_store_fault") == 1


def _assert_ready(base: str) -> None:
    assert get(base + "/readyz") == (200, "ready\n")
    metrics = scrape(base)
    assert metrics.get("dt_trio_ready") == 1
    assert metrics.get("dt_trio_store_fault") == 0


async def test_readyz_is_503_once_the_shutdown_begins(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What the command does on SIGTERM (`Health.drain`, then the cancel; test_health.py
    shows the command drain on SIGTERM): /readyz says not ready from the drain on, while the
    process still serves."""
    from dt_trio._health import Health

    caplog.set_level("INFO", "dt_trio")
    health = Health()
    store = a_store(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                dt_trio.serve, port=0, ui="127.0.0.1:0", health=health, **store.kwargs()
            )
        )
        [base] = _urls(caplog, DASHBOARD_AT)
        assert await trio.to_thread.run_sync(get, base + "/readyz") == (200, "ready\n")
        await health.drain()
        status, body = await trio.to_thread.run_sync(get, base + "/readyz")
        assert (status, body) == (503, "not ready: shutting down\n")
        assert await trio.to_thread.run_sync(get, base + "/healthz") == (200, "ok\n")
        nursery.cancel_scope.cancel()


def _urls(caplog: pytest.LogCaptureFixture, pattern: re.Pattern[str]) -> list[str]:
    """The URLs that log lines of this test gave (`pattern`: what the server logs)."""
    found = (pattern.search(record.getMessage()) for record in caplog.records)
    return [match.group(1) for match in found if match is not None]


# -- hubs in one process -------------------------------------------------------------------

local = dt_trio.Registry()


@local.activity
def shout(ctx: dt_trio.ActivityContext, word: str) -> str:
    return word.upper()


@local.orchestrator
def shouting(ctx: dt_trio.OrchestrationContext, n: int) -> Any:
    out = []
    for i in range(n):
        out.append((yield ctx.call_activity(shout, input=f"w{i}")))
    return out


async def test_each_hub_in_a_process_has_metrics_of_its_own(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two local hubs (the local API: no gRPC, no SDK) each count their own work."""
    caplog.set_level("INFO", "dt_trio")
    first, second = a_store(tmp_path, "one.sqlite3"), a_store(tmp_path, "two.sqlite3")
    async with (
        dt_trio.open_task_hub(registry=local, metrics="127.0.0.1:0", **first.kwargs()) as one,
        dt_trio.open_task_hub(registry=local, metrics="127.0.0.1:0", **second.kwargs()) as two,
    ):
        bases = _urls(caplog, METRICS_AT)
        assert len(bases) == 2
        with trio.fail_after(30):
            for hub, n in ((one, 2), (one, 2), (two, 3)):
                done = await hub.wait_for_completion(await hub.schedule(shouting, n))
                assert done.status is dt_trio.Status.COMPLETED
        scrapes = [await trio.to_thread.run_sync(scrape, base) for base in bases]
        assert await trio.to_thread.run_sync(get, bases[0] + "/readyz") == (200, "ready\n")
    started = "dt_trio_orchestrations_started_total"
    ran = "dt_trio_activities_total"
    assert [s.get(started, name="shouting") for s in scrapes] == [2, 1]
    assert [s.get(ran, name="shout", outcome="completed") for s in scrapes] == [4, 3]
    ended = "dt_trio_orchestrations_ended_total"
    assert [s.get(ended, name="shouting", status="completed") for s in scrapes] == [2, 1]


# -- what a commit counts (pure) -------------------------------------------------------------


@pytest.mark.store_independent
def test_an_end_is_counted_once_and_a_commit_not_applied_counts_nothing() -> None:
    from datetime import UTC, datetime

    from dt_trio import _core as core
    from dt_trio._core import InboxMessage, InstanceState, Status
    from dt_trio._core import _events as ev
    from dt_trio._core import _operations as ops
    from dt_trio._core._commit import Applied, Lease
    from dt_trio._metrics._tally import Tally

    t = datetime.now(UTC)
    running = InstanceState("i1", "orch", "e0", Status.RUNNING, t, t)
    history = [
        ev.orchestrator_started(t),
        ev.execution_started(t, name="orch", instance_id="i1", execution_id="e0", input=None),
    ]
    tally = Tally()
    terminated = core.terminate_now(running, history, "stop", t)
    forced = ops.terminate_forced(terminated, t, t)
    tally.committed(forced, Applied(alternative=True))  # the instance had moved on
    assert not tally.ended
    tally.committed(forced, Applied())
    assert tally.ended == {("orch", Status.TERMINATED): 1}
    # A late event for the ended instance is consumed, and appends nothing: no second end.
    late = [InboxMessage(7, ev.event_raised(t, "late", None))]
    settle = core.plan_step(terminated.state, [*history, *terminated.history], late, t)
    assert isinstance(settle, core.Settle)
    tally.committed(ops.step(Lease("me", 1), settle.result, t), Applied())
    assert tally.ended == {("orch", Status.TERMINATED): 1}
    # A poison step fails its orchestration: an end too.
    poison = core.plan_step(running, history, late, t, core.MAX_STEP_ATTEMPTS + 1)
    assert isinstance(poison, core.Settle) and core.poisoned(running, core.MAX_STEP_ATTEMPTS + 1)
    tally.committed(ops.step(Lease("me", 2), poison.result, t), Applied())
    assert tally.ended == {("orch", Status.TERMINATED): 1, ("orch", Status.FAILED): 1}
    assert not tally.started
