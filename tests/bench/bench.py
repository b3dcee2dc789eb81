"""dt-trio against the official SDK's in-memory reference server, same SDK worker and client.

    python tests/bench/bench.py [--quick] [--rounds N] [--json FILE] [--store postgres]

The servers run in their own processes; this process runs the official Python SDK's worker and
client against each in turn. dt-trio runs on an sqlite file in WAL mode (durable), once more
with --durability full for the hello cities (a sync per commit); the reference keeps everything
in memory. A third server, the no-op (noop.py), stores nothing and does next to nothing: what
the SDK worker does against it shows what a server costing nothing gets out of that worker.
Where the worker is the bottleneck (the fan-out), no server gets much more: the no-op's ratio
to the reference is about as far as any server could lead it.

Each server in turn: StartInstance one after another from one thread with no worker connected;
then with the worker: hello cities started one after another (the starts meet a busy worker,
as a web application's starts do) then awaited; a fan-out/fan-in; single-activity and
3-activity orchestrations one after another on the idle server, each from its start to its
completion seen by the client; the server process's own CPU time per 1,000 hello-cities
orchestrations and per 1,000 fan-out activities. The servers take turns for N rounds (5 by
default; each round another one goes first, after a round of each that warms this process up
and is not counted); figures are the medians, with each round's ratio of dt-trio to the
reference beside them: on a shared machine one run of each can be 20% off either way.

Then the same hello-cities and fan-out workloads run through dt-trio's local Python API (no
gRPC: orchestrations and activities in the hub's own process, on an sqlite file; each round in
a fresh interpreter, as a user's script), in normal and full durability, and a scale run
(100,000 completed instances). The run ends with a markdown table of each target of the
performance issues with its ratio, and the figures: printed, and written beside the JSON
results (a full run's go to docs/bench-results/DATE-COMMIT.json and .md, to be committed).

With --store postgres, dt-trio on PostgreSQL instead, with 1, 2 and 3 sidecars: see
bench_postgres.py.
Last, what the web dashboard costs: hello cities on dt-trio without it, and with three
clients on its instance list (the page, then its live stream, as a browser keeps it open),
in turns (`--only-dashboard` measures only that).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import http.client
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio
from durabletask import client, task, worker

import dt_trio

logging.disable(logging.WARNING)


def say_hello(ctx: task.ActivityContext, city: str) -> str:
    return f"Hello, {city}!"


def hello_cities(ctx: task.OrchestrationContext, _: Any) -> Any:
    out = []
    for city in ("Tokyo", "Seattle", "London"):
        out.append((yield ctx.call_activity(say_hello, input=city)))
    return out


def fan_out(ctx: task.OrchestrationContext, n: int) -> Any:
    return len(
        (yield task.when_all([ctx.call_activity(say_hello, input=str(i)) for i in range(n)]))
    )


def one_activity(ctx: task.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.call_activity(say_hello, input="x"))


def echo(ctx: task.OrchestrationContext, n: Any) -> Any:
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the server did not start")


@dataclasses.dataclass(frozen=True)
class Server:
    address: str
    pid: int

    def cpu_seconds(self) -> float:
        """The server process's own CPU time so far (user + system, all its threads)."""
        return cpu_seconds(self.pid)


def proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (which is in parentheses and may hold
    spaces): [0] the state, [1] the parent's pid, [11:13] user and system CPU, [13:15] those
    of the children it waited for."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """A process's CPU time so far (user + system, all its threads), in seconds; with
    `reaped`, that of the children it has waited for too."""
    fields = proc_stat(pid)
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def server(kind: str, ui: str | None = None, db: str | None = None) -> Iterator[Server]:
    """A server of `kind` on a free port; dt-trio serves its dashboard at `ui` if given, and
    keeps its store at `db` if given (an address: PostgreSQL's, say), else in a file of its
    own."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        if kind.startswith("dt-trio"):
            cmd = [
                sys.executable,
                "-m",
                "dt_trio",
                "--port",
                str(port),
                "--log-level",
                "WARNING",
                "--db",
                db or os.path.join(tmp, "bench.sqlite3"),
                "--durability",
                "full" if kind == FULL else "normal",
                *(["--ui", ui] if ui else ["--no-ui"]),
            ]
        elif kind == "reference":
            code = (
                "import time; from durabletask.testing import create_test_backend; "
                f"create_test_backend(port={port}); time.sleep(10**6)"
            )
            cmd = [sys.executable, "-c", code]
        else:
            noop = os.path.join(os.path.dirname(os.path.abspath(__file__)), "noop.py")
            cmd = [sys.executable, noop, "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port, proc)
            yield Server(f"127.0.0.1:{port}", proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def spread(values: list[float], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}p{p}_ms": percentile(values, p) for p in (50, 90, 99)}


def timed_starts(
    c: client.TaskHubGrpcClient, orchestrator: Any, n: int
) -> tuple[list[str], list[float]]:
    """`n` StartInstance calls one after another from this thread, as a web application
    starts work: the ids and each call's latency (ms)."""
    ids, latencies = [], []
    for _ in range(n):
        started = time.perf_counter()
        ids.append(c.schedule_new_orchestration(orchestrator))
        latencies.append((time.perf_counter() - started) * 1000)
    return ids, latencies


def hello_workload(c: client.TaskHubGrpcClient, n: int, server: Server) -> dict[str, float]:
    """`n` hello cities started one after another, then awaited. The starts after the first
    few meet a busy worker (and server): their latency is the start loop's with a busy worker."""
    cpu = server.cpu_seconds()
    started = time.perf_counter()
    ids, starts = timed_starts(c, hello_cities, n)
    latencies = []
    for instance_id in ids:
        state = c.wait_for_orchestration_completion(instance_id, timeout=600)
        assert state is not None and state.runtime_status == client.OrchestrationStatus.COMPLETED
        latencies.append((state.last_updated_at - state.created_at).total_seconds() * 1000)
    elapsed = time.perf_counter() - started
    return {
        "orchestrations_per_s": n / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        **spread(starts, "start_"),
        "cpu_s_per_1000": (server.cpu_seconds() - cpu) * 1000 / n,
    }


def fan_out_workload(c: client.TaskHubGrpcClient, n: int, server: Server) -> dict[str, float]:
    """One orchestration fanning out to `n` activities and in, three times in a row: the
    median. One takes under a second, too short to stand alone on a shared machine."""
    rates = []
    cpu = server.cpu_seconds()
    for _ in range(3):
        started = time.perf_counter()
        instance_id = c.schedule_new_orchestration(fan_out, input=n)
        state = c.wait_for_orchestration_completion(instance_id, timeout=600)
        assert state is not None and state.serialized_output == str(n)
        rates.append(n / (time.perf_counter() - started))
    return {
        "activities_per_s": percentile(rates, 50),
        "cpu_s_per_1000": (server.cpu_seconds() - cpu) * 1000 / (3 * n),
    }


def sequential(
    orchestrator: Any,
) -> Callable[[client.TaskHubGrpcClient, int, Server], dict[str, float]]:
    """`n` instances of `orchestrator` one after another on an idle server, each from its
    start to its completion seen by the client."""

    def workload(c: client.TaskHubGrpcClient, n: int, server: Server) -> dict[str, float]:
        latencies = []
        for _ in range(n):
            started = time.perf_counter()
            instance_id = c.schedule_new_orchestration(orchestrator)
            state = c.wait_for_orchestration_completion(instance_id, timeout=60)
            assert (
                state is not None and state.runtime_status == client.OrchestrationStatus.COMPLETED
            )
            latencies.append((time.perf_counter() - started) * 1000)
        return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}

    return workload


Workload = Callable[[client.TaskHubGrpcClient, int, Server], dict[str, float]]
# StartInstance one after another with no worker connected (before the others, see `run`):
# how many, in a full run and in a --quick one
STARTS_NO_WORKER = "starts, no worker"
NO_WORKER_SIZES = (300, 50)
WORKLOADS: dict[str, tuple[Workload, int, int]] = {
    # name: (function, full size, --quick size)
    "hello cities": (hello_workload, 1000, 100),
    "fan-out/fan-in": (fan_out_workload, 1000, 200),
    "idle latency": (sequential(one_activity), 200, 30),
    "idle 3-activity chain": (sequential(hello_cities), 100, 20),
}
FULL = "dt-trio (full)"
# dt-trio; the SDK's in-memory test server; a server that stores nothing (see noop.py); and
# dt-trio with --durability full, for the workloads that say what a sync per commit costs
KINDS = ("dt-trio", "reference", "no-op", FULL)
ONLY: dict[str, tuple[str, ...]] = {FULL: ("hello cities",)}


def run(kind: str, quick: bool) -> dict[str, dict[str, float]]:
    results = {}
    names = ONLY.get(kind, tuple(WORKLOADS))
    with server(kind) as s:
        c = client.TaskHubGrpcClient(host_address=s.address)
        w = worker.TaskHubGrpcWorker(host_address=s.address)
        try:
            # Start latency with no worker connected: the instances wait for one; the first
            # starts open the channel and are not counted.
            early, _ = timed_starts(c, echo, 10)
            ids, starts = timed_starts(c, echo, NO_WORKER_SIZES[quick])
            results[STARTS_NO_WORKER] = spread(starts)
            for o in (hello_cities, fan_out, one_activity, echo):
                w.add_orchestrator(o)
            w.add_activity(say_hello)
            w.start()
            for instance_id in early + ids:
                c.wait_for_orchestration_completion(instance_id, timeout=60)
            sequential(one_activity)(c, 5, s)  # warm-up: the worker's connection, imports
            for name in names:
                fn, full, small = WORKLOADS[name]
                results[name] = fn(c, small if quick else full, s)
        finally:
            # A channel left open keeps reconnecting to the stopped server, in this process,
            # through every run after it.
            c.close()
            w.stop()
    return results


local = dt_trio.Registry()


@local.activity
async def local_hello(ctx: dt_trio.ActivityContext, city: str) -> str:
    return f"Hello, {city}!"


@local.orchestrator
def local_hello_cities(ctx: dt_trio.OrchestrationContext, _: Any) -> Any:
    out = []
    for city in ("Tokyo", "Seattle", "London"):
        out.append((yield ctx.call_activity(local_hello, input=city)))
    return out


@local.orchestrator
def local_fan_out(ctx: dt_trio.OrchestrationContext, n: int) -> Any:
    return len(
        (yield dt_trio.when_all([ctx.call_activity(local_hello, input=str(i)) for i in range(n)]))
    )


async def local_workloads(quick: bool, durability: str) -> dict[str, dict[str, float]]:
    """The local API on an sqlite file: all started at once (concurrent schedules, as
    concurrent clients would), then waited for."""
    n_hello, n_fan = (100, 200) if quick else (1000, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "local.sqlite3")
        mode = dt_trio.Durability(durability)
        async with dt_trio.open_task_hub(db, registry=local, durability=mode) as c:
            await c.wait_for_completion(await c.schedule(local_hello_cities))  # warm-up
            started = time.perf_counter()
            ids: list[str] = []

            async def schedule_one() -> None:
                ids.append(await c.schedule(local_hello_cities))

            async with trio.open_nursery() as nursery:
                for _ in range(n_hello):
                    nursery.start_soon(schedule_one)
            latencies = []
            for instance_id in ids:
                state = await c.wait_for_completion(instance_id)
                assert state.status == dt_trio.Status.COMPLETED
                latencies.append((state.last_updated_at - state.created_at).total_seconds() * 1000)
            hello = {
                "orchestrations_per_s": n_hello / (time.perf_counter() - started),
                "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99),
            }
            started = time.perf_counter()
            state = await c.wait_for_completion(await c.schedule(local_fan_out, n_fan))
            assert state.output == n_fan
            fan = {"activities_per_s": n_fan / (time.perf_counter() - started)}
    return {"hello cities": hello, "fan-out/fan-in": fan}


@local.orchestrator
def local_echo(ctx: dt_trio.OrchestrationContext, n: int) -> Any:
    return n


async def fill_store(db: str, count: int) -> None:
    """`count` completed instances, written through the engine itself (local API)."""
    async with dt_trio.open_task_hub(db, registry=local) as c:

        async def start(n: int, ids: list[str]) -> None:
            ids.append(await c.schedule(local_echo, n, instance_id=f"scale-{n:07d}"))

        for first in range(0, count, 1000):
            ids: list[str] = []
            async with trio.open_nursery() as nursery:
                for n in range(first, min(count, first + 1000)):
                    nursery.start_soon(start, n, ids)
            for instance_id in ids:
                await c.wait_for_completion(instance_id)


def medians(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per workload and metric, the median of the runs (`percentile` 50)."""
    return {
        name: {metric: percentile([r[name][metric] for r in runs], 50) for metric in metrics}
        for name, metrics in runs[0].items()
    }


def rss_mb(pid: int) -> dict[str, float]:
    fields = dict(
        line.split(":", 1)
        for line in open(f"/proc/{pid}/status").read().splitlines()
        if ":" in line
    )
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def scale_run(count: int) -> dict[str, float]:
    """QueryInstances and GetInstance on a store of `count` completed instances, and what the
    sidecar's memory and the file weigh; the sidecar's memory on an empty store for contrast."""
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "scale.sqlite3")
        started = time.perf_counter()
        trio.run(fill_store, db, count)
        results["fill_s"] = time.perf_counter() - started
        results["file_mb"] = sum(
            os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp) if "scale" in f
        ) / (1 << 20)
        for label, path in (("empty", os.path.join(tmp, "empty.sqlite3")), ("full", db)):
            port = free_port()
            cmd = [sys.executable, "-m", "dt_trio", "--port", str(port), "--db", path, "--no-ui"]
            proc = subprocess.Popen(
                [*cmd, "--log-level", "WARNING"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_listening(port, proc)
                c = client.TaskHubGrpcClient(host_address=f"127.0.0.1:{port}")
                if label == "full":
                    pages, gets = [], []
                    for _ in range(50):
                        t = time.perf_counter()
                        first_page(c)
                        pages.append((time.perf_counter() - t) * 1000)
                    for n in range(0, count, max(1, count // 200)):
                        t = time.perf_counter()
                        state = c.get_orchestration_state(f"scale-{n:07d}")
                        gets.append((time.perf_counter() - t) * 1000)
                        assert state is not None
                    results["query_first_page_p50_ms"] = percentile(pages, 50)
                    results["get_instance_p50_ms"] = percentile(gets, 50)
                memory = rss_mb(proc.pid)
                results[f"sidecar_rss_{label}_mb"] = memory["VmRSS"]
                results[f"sidecar_peak_rss_{label}_mb"] = memory["VmHWM"]
                c.close()
            finally:
                proc.terminate()
                proc.wait(30)
    return results


def first_page(c: client.TaskHubGrpcClient) -> None:
    """One QueryInstances page of 100 (the SDK's query helper would fetch every page)."""
    from durabletask.internal import orchestrator_service_pb2 as pb

    request = pb.QueryInstancesRequest(
        query=pb.InstanceQuery(
            runtimeStatus=[pb.ORCHESTRATION_STATUS_COMPLETED], maxInstanceCount=100
        )
    )
    response = c._stub.QueryInstances(request)  # the raw rpc: exactly one page
    assert len(response.orchestrationState) == 100


def local_round(quick: bool, durability: str) -> dict[str, dict[str, float]]:
    """One round of `local_workloads` in an interpreter of its own, as a user's script would
    run it: not in this one, which carries the SDK's worker, clients and earlier rounds."""
    cmd = [sys.executable, __file__, "--local-round", durability, *(["--quick"] if quick else [])]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, dict[str, float]] = json.loads(done.stdout)
    return result


@dataclasses.dataclass(frozen=True)
class Target:
    """One target of the performance issues: dt-trio's figure against a baseline's."""

    what: str
    ours: float
    baseline: float
    baseline_name: str
    unit: str
    goal: str  # "<= 1.5" or ">= 1.2": the ratio ours / baseline
    by_round: list[float]

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline

    @property
    def met(self) -> bool:
        sign, bound = self.goal.split()
        return self.ratio <= float(bound) if sign == "<=" else self.ratio >= float(bound)


def targets(
    rounds: list[dict[str, dict[str, dict[str, float]]]],
    local_rounds: list[dict[str, dict[str, dict[str, float]]]],
    scale: dict[str, float],
    sizes: dict[str, int],
) -> list[Target]:
    def server(kind: str, name: str, metric: str) -> list[float]:
        return [r[kind][name][metric] for r in rounds]

    def against(
        what: str, name: str, metric: str, unit: str, goal: str, baseline: str = "reference"
    ) -> Target:
        ours, theirs = (
            server(FULL if baseline == "dt-trio" else "dt-trio", name, metric),
            (server(baseline, name, metric)),
        )
        return Target(
            what,
            percentile(ours, 50),
            percentile(theirs, 50),
            baseline,
            unit,
            goal,
            [a / b for a, b in zip(ours, theirs, strict=True)],
        )

    local_hello = [r["normal"]["hello cities"]["orchestrations_per_s"] for r in local_rounds]
    local_full = [r["full"]["hello cities"]["orchestrations_per_s"] for r in local_rounds]
    found = [
        against(
            "StartInstance from one thread, busy worker: p50",
            "hello cities",
            "start_p50_ms",
            "ms",
            "<= 1.5",
        ),
        against(
            "StartInstance from one thread, busy worker: p99",
            "hello cities",
            "start_p99_ms",
            "ms",
            "<= 2.0",
        ),
        against(
            "idle 3-activity chain, start to completion seen: p50",
            "idle 3-activity chain",
            "p50_ms",
            "ms",
            "<= 1.0",
        ),
        against(
            "idle single activity, start to completion seen: p99",
            "idle latency",
            "p99_ms",
            "ms",
            "<= 1.2",
        ),
        against(
            "sidecar CPU per 1,000 hello-cities orchestrations",
            "hello cities",
            "cpu_s_per_1000",
            "s",
            "<= 1.0",
        ),
        against(
            "sidecar CPU per 1,000 fan-out activities",
            "fan-out/fan-in",
            "cpu_s_per_1000",
            "s",
            "<= 1.0",
        ),
        against(
            f"hello cities, {sizes['hello cities']:,} started then awaited",
            "hello cities",
            "orchestrations_per_s",
            "/s",
            ">= 1.2",
        ),
        against(
            f"fan-out/fan-in, {sizes['fan-out/fan-in']:,} activities",
            "fan-out/fan-in",
            "activities_per_s",
            "/s",
            ">= 1.1",
        ),
        against(
            "hello cities with --durability full",
            "hello cities",
            "orchestrations_per_s",
            "/s",
            ">= 0.85",
            "dt-trio",
        ),
        Target(
            "local API: hello cities with durability full",
            percentile(local_full, 50),
            percentile(local_hello, 50),
            "normal",
            "/s",
            ">= 0.85",
            [a / b for a, b in zip(local_full, local_hello, strict=True)],
        ),
        Target(
            f"local API: hello cities, {sizes['hello cities']:,} started at once",
            percentile(local_hello, 50),
            2000,
            "2,000/s",
            "/s",
            ">= 1.0",
            [x / 2000 for x in local_hello],
        ),
    ]
    for what, metric, bound, unit in (
        ("first QueryInstances page, p50", "query_first_page_p50_ms", 20, "ms"),
        ("GetInstance, p50", "get_instance_p50_ms", 20, "ms"),
        ("sidecar peak RSS", "sidecar_peak_rss_full_mb", 250, "MB"),
    ):
        what = f"{scale['instances']:,} instances in the store: {what}"
        found.append(Target(what, scale[metric], bound, f"{bound} {unit}", unit, "<= 1.0", []))
    return found


def number(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def machine() -> dict[str, Any]:
    """What ran the bench: cores, CPU, Python, and the file system of the stores' files."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    tmp = os.path.realpath(tempfile.gettempdir())
    mounts = [line.split()[1:3] for line in open("/proc/mounts")]
    fs = max(
        (
            (point, kind)
            for point, kind in mounts
            if tmp == point or tmp.startswith(point.rstrip("/") + "/")
        ),
        key=lambda m: len(m[0]),
    )
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "temp_dir": f"{tmp} ({fs[1]})",
    }


def commit() -> str:
    """The checked-out commit, marked if tracked files differ from it."""
    here = os.path.dirname(os.path.abspath(__file__))
    git = ["git", "-C", here]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD"]).returncode != 0
    return head.stdout.strip() + ("+changes" if dirty else "")


def markdown(report: dict[str, Any], found: list[Target]) -> str:
    """The run as markdown tables, to paste: the targets, then every figure."""
    m = report["machine"]
    rounds = report["rounds"]
    out = [
        f"Run of {report['date']}, commit {report['commit']}, `python3 -m nox -s bench`"
        f"{' -- --quick' if report['quick'] else ''}: {m['cores']} cores ({m['cpu']}), "
        f"Python {m['python']}, stores in {m['temp_dir']}; medians of {rounds} rounds.",
        "",
        "| target | dt-trio | against | ratio | goal | met | ratio by round |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for t in found:
        against = f"{number(t.baseline)} {t.unit} ({t.baseline_name})"
        if t.baseline_name.endswith(t.unit) or t.baseline_name.endswith(t.unit.strip("/")):
            against = t.baseline_name
        out.append(
            f"| {t.what} | {number(t.ours)} {t.unit} | {against} | {t.ratio:.2f} | {t.goal} "
            f"| {'yes' if t.met else 'no'} | {' '.join(f'{x:.2f}' for x in t.by_round)} |"
        )
    results = report["results"]
    out += [
        "",
        "| workload (n) | metric | " + " | ".join(KINDS) + " | dt-trio / reference |",
        "| --- | --- |" + " ---: |" * (len(KINDS) + 1),
    ]
    for name, metrics in results["dt-trio"].items():
        for metric, ours in metrics.items():
            cells = [
                number(results[kind][name][metric]) if name in results[kind] else ""
                for kind in KINDS
            ]
            ratio = ours / results["reference"][name][metric]
            size = report["sizes"][name]
            out.append(f"| {name} ({size}) | {metric} | {' | '.join(cells)} | {ratio:.2f} |")
    out += [
        "",
        "| local API (no gRPC), sqlite file | metric | normal | full |",
        "| --- | --- | ---: | ---: |",
    ]
    local_results = report["local"]
    for name, metrics in local_results["normal"].items():
        for metric, value in metrics.items():
            full = local_results["full"][name][metric]
            size = report["sizes"][name]
            out.append(f"| {name} ({size}) | {metric} | {number(value)} | {number(full)} |")
    scale = report["scale"]
    out += [
        "",
        f"| scale run: {scale['instances']:,} completed instances | dt-trio |",
        "| --- | ---: |",
    ]
    out += [
        f"| {metric} | {number(value)} |"
        for metric, value in scale.items()
        if metric != "instances"
    ]
    return "\n".join(out) + "\n"


class LiveClients:
    """`count` clients on the dashboard's instance list, as a browser keeps it open: the page
    once, then its live stream (a redraw of the list at most once a second while the hub
    changes), read until `stop`."""

    def __init__(self, url: str, count: int) -> None:
        self.url = url
        self.updates = [0] * count
        self._connections: list[http.client.HTTPConnection] = []
        self._threads = [threading.Thread(target=self._follow, args=(i,)) for i in range(count)]
        self._ready = threading.Barrier(count + 1)  # every page open and first drawn

    def _follow(self, index: int) -> None:
        parts = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
        self._connections.append(conn)
        conn.request("GET", "/instances")
        conn.getresponse().read()
        conn.request("GET", "/api/live/instances")
        stream = conn.getresponse()
        try:
            for line in stream:
                if line.startswith(b"event: update"):
                    self.updates[index] += 1
                    if self.updates[index] == 1:
                        self._ready.wait(60)
        except (OSError, ValueError, http.client.HTTPException):
            pass  # closed by `stop`

    def __enter__(self) -> LiveClients:
        for thread in self._threads:
            thread.start()
        self._ready.wait(60)  # a browser already open on the page: its first load not counted
        return self

    def __exit__(self, *exc: object) -> None:
        for conn in self._connections:
            if conn.sock is not None:
                conn.sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(30)


def dashboard_round(quick: bool, clients: int) -> dict[str, float]:
    """hello cities on dt-trio without a dashboard (`clients` 0) or with `clients` clients
    on its instance list."""
    ui = f"127.0.0.1:{free_port()}" if clients else None
    n = WORKLOADS["hello cities"][2 if quick else 1]
    with server("dt-trio", ui) as s:
        address = s.address
        w = worker.TaskHubGrpcWorker(host_address=address)
        w.add_orchestrator(hello_cities)
        w.add_orchestrator(one_activity)
        w.add_activity(say_hello)
        w.start()
        c = client.TaskHubGrpcClient(host_address=address)
        try:
            sequential(one_activity)(c, 5, s)  # warm the worker and the sidecar up
            with contextlib.ExitStack() as stack:
                live = (
                    stack.enter_context(LiveClients(f"http://{ui}", clients)) if clients else None
                )
                result = hello_workload(c, n, s)
                result["sidecar_cpu_ms_per_orchestration"] = result["cpu_s_per_1000"]
            if live is not None:
                # the first update of each is the page as it was before the run
                result["list_updates_per_client"] = sum(live.updates) / clients - 1
            return result
        finally:
            c.close()
            w.stop()


DASHBOARD_CLIENTS = 3


def dashboard_cost(quick: bool, rounds: int) -> dict[str, Any]:
    """Rounds of hello cities without the dashboard and with DASHBOARD_CLIENTS clients on
    its instance list, in turns; the medians and the cost (1 - with / without)."""
    runs: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
    for i in range(rounds):
        for label in ("without", "with") if i % 2 == 0 else ("with", "without"):
            clients = DASHBOARD_CLIENTS if label == "with" else 0
            runs[label].append(dashboard_round(quick, clients))

    def median(label: str, metric: str) -> float:
        return percentile([r[metric] for r in runs[label]], 50)

    without = median("without", "orchestrations_per_s")
    with_ui = median("with", "orchestrations_per_s")
    cpu_without = median("without", "sidecar_cpu_ms_per_orchestration")
    cpu_with = median("with", "sidecar_cpu_ms_per_orchestration")
    return {
        "orchestrations_per_s_without": without,
        "orchestrations_per_s_with": with_ui,
        "cost": 1 - with_ui / without,
        "sidecar_cpu_ms_per_orchestration_without": cpu_without,
        "sidecar_cpu_ms_per_orchestration_with": cpu_with,
        "cpu_cost": cpu_with / cpu_without - 1,
        "list_updates_per_client": percentile(
            [r["list_updates_per_client"] for r in runs["with"]], 50
        ),
        "each_round": runs,
    }


def dashboard_line(dashboard: dict[str, Any], rounds: int) -> str:
    return (
        f"dashboard: hello cities {dashboard['orchestrations_per_s_without']:.1f}/s without it, "
        f"{dashboard['orchestrations_per_s_with']:.1f}/s with {DASHBOARD_CLIENTS} clients on "
        f"its live instance list ({dashboard['list_updates_per_client']:.0f} list updates "
        f"each): costs {dashboard['cost']:.1%} of the throughput and "
        f"{dashboard['cpu_cost']:.1%} more sidecar CPU per orchestration "
        f"({dashboard['sidecar_cpu_ms_per_orchestration_without']:.2f} -> "
        f"{dashboard['sidecar_cpu_ms_per_orchestration_with']:.2f} ms per 1,000; "
        f"medians of {rounds} rounds)\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--local-round", choices=["normal", "full"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--json",
        help="where to write the results; the markdown tables go beside it (.md) "
        "(default: docs/bench-results/DATE-COMMIT.json, bench-results.json with --quick)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="runs of each server (alternating which goes first) and of the local API; "
        "medians are reported",
    )
    parser.add_argument(
        "--store",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="postgres: 1, 2 and 3 sidecars on PostgreSQL (see bench_postgres.py)",
    )
    parser.add_argument(
        "--only-dashboard",
        action="store_true",
        help="measure only what the dashboard costs (hello cities with three live clients)",
    )
    args = parser.parse_args()
    if args.store == "postgres":
        import bench_postgres

        return bench_postgres.main(args.quick, args.rounds, args.json)
    if args.local_round:
        print(json.dumps(trio.run(local_workloads, args.quick, args.local_round)))
        return 0
    date = datetime.date.today().isoformat()
    at = commit()
    if args.json is None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        args.json = (
            "bench-results.json"
            if args.quick
            else os.path.join(root, "docs", "bench-results", f"{date}-{at}.json")
        )
    # A shared machine drifts: the servers take turns, each round another goes first, and
    # each figure is the median of the rounds; the ratio of each round shows the spread.
    # The first runs in this process are slower for the SDK worker and client that run here
    # (the first 1,000-activity fan-out of the process, say): whichever server went first
    # paid for it. A round of each, not counted, warms them up.
    if args.only_dashboard:
        dashboard = dashboard_cost(args.quick, args.rounds)
        print(dashboard_line(dashboard, args.rounds))
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "quick": args.quick, "dashboard": dashboard}, f)
        return 0
    for kind in KINDS:
        run(kind, args.quick)
    rounds: list[dict[str, dict[str, dict[str, float]]]] = []
    for i in range(args.rounds):
        order = KINDS[i % len(KINDS) :] + KINDS[: i % len(KINDS)]
        rounds.append({kind: run(kind, args.quick) for kind in order})
        print(f"round {i + 1} of {args.rounds} done", file=sys.stderr)
    measured = {kind: medians([r[kind] for r in rounds]) for kind in KINDS}
    local_rounds = []
    for i in range(args.rounds):
        modes = ("normal", "full") if i % 2 == 0 else ("full", "normal")
        local_rounds.append({mode: local_round(args.quick, mode) for mode in modes})
    local_results = {mode: medians([r[mode] for r in local_rounds]) for mode in ("normal", "full")}
    count = 5_000 if args.quick else 100_000
    scale = scale_run(count)
    dashboard = dashboard_cost(args.quick, args.rounds)
    print(dashboard_line(dashboard, args.rounds))
    sizes = {name: small if args.quick else full for name, (_, full, small) in WORKLOADS.items()}
    sizes[STARTS_NO_WORKER] = NO_WORKER_SIZES[args.quick]
    report = {
        "date": date,
        "commit": at,
        "machine": machine(),
        "quick": args.quick,
        "rounds": args.rounds,
        "sizes": sizes,
        "results": measured,
        "local": local_results,
        "each_round": {"servers": rounds, "local": local_rounds},
        "scale": {"instances": count, **scale},
        "dashboard": dashboard,
    }
    found = targets(rounds, local_rounds, report["scale"], sizes)
    report["targets"] = [{**dataclasses.asdict(t), "ratio": t.ratio, "met": t.met} for t in found]
    table = markdown(report, found)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
        f.write(table)
    print(table)
    print(f"written to {args.json} and its .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
