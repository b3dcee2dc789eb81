"""dt-trio against the official SDK's in-memory reference server, same SDK worker and client.

    python tests/bench/bench.py [--quick] [--rounds N] [--json FILE] [--store postgres]

Both servers run in their own process; this process runs the official Python SDK's worker and
client against each in turn and prints one table with the ratio dt-trio / reference. dt-trio
runs on an sqlite file in WAL mode (durable); the reference keeps everything in memory. A
third server, the no-op (noop.py), stores nothing and does next to nothing: what the SDK
worker does against it shows what a server costing nothing gets out of that worker. Where the
worker is the bottleneck (the fan-out), no server gets much more: the no-op's ratio to the
reference is about as far as any server could lead it. The servers take turns for N rounds (5 by
default; each round another one goes first, after a round of each that warms this process up
and is not counted) and the table gives the medians, with each round's ratio of dt-trio to the
reference beside them: on a shared machine one run of each can be 20% off either way.

Then the same hello-cities and fan-out workloads run through dt-trio's local Python API (no
gRPC: orchestrations and activities in the hub's own process, on an sqlite file; each round in
a fresh interpreter, as a user's script), which the reference has no counterpart for; they are
reported on their own.

With --store postgres, dt-trio on PostgreSQL instead, with 1, 2 and 3 sidecars: see
bench_postgres.py.
Last, what the web dashboard costs: hello cities on dt-trio without it, and with three
clients on its instance list (the page, then its live stream, as a browser keeps it open),
in turns (`--only-dashboard` measures only that).
"""

from __future__ import annotations

import argparse
import contextlib
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


# The process of each running server, by address (for its CPU time).
SERVER_PIDS: dict[str, int] = {}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far."""
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def server(kind: str, ui: str | None = None) -> Iterator[str]:
    """A server of `kind` on a free port; dt-trio serves its dashboard at `ui` if given."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "dt-trio":
            cmd = [
                sys.executable,
                "-m",
                "dt_trio",
                "--port",
                str(port),
                "--log-level",
                "WARNING",
                "--db",
                os.path.join(tmp, "bench.sqlite3"),
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
            SERVER_PIDS[f"127.0.0.1:{port}"] = proc.pid
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(30)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def hello_workload(c: client.TaskHubGrpcClient, n: int) -> dict[str, float]:
    started = time.perf_counter()
    ids = [c.schedule_new_orchestration(hello_cities) for _ in range(n)]
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
    }


def fan_out_workload(c: client.TaskHubGrpcClient, n: int) -> dict[str, float]:
    """One orchestration fanning out to `n` activities and in, three times in a row: the
    median. One takes under a second, too short to stand alone on a shared machine."""
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        instance_id = c.schedule_new_orchestration(fan_out, input=n)
        state = c.wait_for_orchestration_completion(instance_id, timeout=600)
        assert state is not None and state.serialized_output == str(n)
        rates.append(n / (time.perf_counter() - started))
    return {"activities_per_s": percentile(rates, 50)}


def idle_workload(c: client.TaskHubGrpcClient, n: int) -> dict[str, float]:
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        instance_id = c.schedule_new_orchestration(one_activity)
        c.wait_for_orchestration_completion(instance_id, timeout=60)
        latencies.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}


WORKLOADS: dict[
    str, tuple[Callable[[client.TaskHubGrpcClient, int], dict[str, float]], int, int]
] = {
    # name: (function, full size, --quick size)
    "hello cities": (hello_workload, 1000, 100),
    "fan-out/fan-in": (fan_out_workload, 1000, 200),
    "idle latency": (idle_workload, 200, 30),
}
# dt-trio; the SDK's in-memory test server; a server that stores nothing (see noop.py)
KINDS = ("dt-trio", "reference", "no-op")


def run(kind: str, quick: bool) -> dict[str, dict[str, float]]:
    results = {}
    with server(kind) as address:
        w = worker.TaskHubGrpcWorker(host_address=address)
        for o in (hello_cities, fan_out, one_activity):
            w.add_orchestrator(o)
        w.add_activity(say_hello)
        w.start()
        c = client.TaskHubGrpcClient(host_address=address)
        try:
            idle_workload(c, 5)  # warm-up: connections, imports
            for name, (fn, full, small) in WORKLOADS.items():
                results[name] = fn(c, small if quick else full)
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


async def local_workloads(quick: bool) -> dict[str, dict[str, float]]:
    """The local API on an sqlite file: all started at once (concurrent schedules, as
    concurrent clients would), then waited for."""
    n_hello, n_fan = (100, 200) if quick else (1000, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "local.sqlite3")
        async with dt_trio.open_task_hub(db, registry=local) as c:
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
    return {f"hello cities (n={n_hello})": hello, f"fan-out/fan-in (n={n_fan})": fan}


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
    with server("dt-trio", ui) as address:
        w = worker.TaskHubGrpcWorker(host_address=address)
        w.add_orchestrator(hello_cities)
        w.add_orchestrator(one_activity)
        w.add_activity(say_hello)
        w.start()
        c = client.TaskHubGrpcClient(host_address=address)
        try:
            idle_workload(c, 5)
            pid = SERVER_PIDS[address]
            with contextlib.ExitStack() as stack:
                live = (
                    stack.enter_context(LiveClients(f"http://{ui}", clients)) if clients else None
                )
                cpu = cpu_seconds(pid)
                result = hello_workload(c, n)
                result["sidecar_cpu_ms_per_orchestration"] = (cpu_seconds(pid) - cpu) * 1000 / n
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


def local_round(quick: bool) -> dict[str, dict[str, float]]:
    """One round of `local_workloads` in an interpreter of its own, as a user's script would
    run it: not in this one, which carries the SDK's worker, clients and earlier rounds."""
    cmd = [sys.executable, __file__, "--local-round", *(["--quick"] if quick else [])]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, dict[str, float]] = json.loads(done.stdout)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--local-round", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default="bench-results.json", help="where to write results")
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
        print(json.dumps(trio.run(local_workloads, args.quick)))
        return 0
    dashboard = dashboard_cost(args.quick, args.rounds)
    print(
        f"dashboard: hello cities {dashboard['orchestrations_per_s_without']:.1f}/s without it, "
        f"{dashboard['orchestrations_per_s_with']:.1f}/s with {DASHBOARD_CLIENTS} clients on "
        f"its live instance list ({dashboard['list_updates_per_client']:.0f} list updates "
        f"each): costs {dashboard['cost']:.1%} of the throughput and "
        f"{dashboard['cpu_cost']:.1%} more sidecar CPU per orchestration "
        f"({dashboard['sidecar_cpu_ms_per_orchestration_without']:.2f} -> "
        f"{dashboard['sidecar_cpu_ms_per_orchestration_with']:.2f} ms; "
        f"medians of {args.rounds} rounds)\n"
    )
    if args.only_dashboard:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "quick": args.quick, "dashboard": dashboard}, f)
        return 0
    # A shared machine drifts: the servers take turns, each round the other goes first, and
    # each figure is the median of the rounds; the ratio of each round shows the spread.
    # The first runs in this process are slower for the SDK worker and client that run here
    # (the first 1,000-activity fan-out of the process, say): whichever server went first
    # paid for it. A round of each, not counted, warms them up.
    for kind in KINDS:
        run(kind, args.quick)
    rounds: list[dict[str, dict[str, dict[str, float]]]] = []
    for i in range(args.rounds):
        order = KINDS[i % len(KINDS) :] + KINDS[: i % len(KINDS)]
        rounds.append({kind: run(kind, args.quick) for kind in order})
    measured = {kind: medians([r[kind] for r in rounds]) for kind in KINDS}
    rows = []
    for name, (_, full, small) in WORKLOADS.items():
        size = small if args.quick else full
        for metric, ours in measured["dt-trio"][name].items():
            ref = measured["reference"][name][metric]
            noop = measured["no-op"][name][metric]
            spread = [r["dt-trio"][name][metric] / r["reference"][name][metric] for r in rounds]
            rows.append(
                (f"{name} (n={size})", metric, ours, ref, noop, ours / ref, noop / ref, spread)
            )
    print(f"medians of {args.rounds} rounds; ratios are to the reference")
    print(
        f"{'workload':<24} {'metric':<22} {'dt-trio':>10} {'reference':>10} {'no-op':>10} "
        f"{'dt-trio/ref':>11} {'no-op/ref':>9}  dt-trio/ref by round"
    )
    for workload, metric, ours, ref, noop, ratio, noop_ratio, spread in rows:
        print(
            f"{workload:<24} {metric:<22} {ours:>10.1f} {ref:>10.1f} {noop:>10.1f} "
            f"{ratio:>11.2f} {noop_ratio:>9.2f}  {' '.join(f'{x:.2f}' for x in spread)}"
        )
    local_rounds = [local_round(args.quick) for _ in range(args.rounds)]
    local_results = medians(local_rounds)
    print(f"\nlocal Python API (no gRPC), sqlite file, medians of {args.rounds} rounds")
    for workload, metrics in local_results.items():
        for metric, value in metrics.items():
            values = " ".join(f"{r[workload][metric]:.0f}" for r in local_rounds)
            print(f"{workload:<24} {metric:<22} {value:>10.1f}  ({values})")
    count = 5_000 if args.quick else 100_000
    scale = scale_run(count)
    print(f"\nscale run: {count:,} completed instances in the store")
    for metric, value in scale.items():
        print(f"{metric:<30} {value:>10.1f}")
    report = {
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "quick": args.quick,
        "rounds": args.rounds,
        "results": measured,
        "local": local_results,
        "each_round": {"servers": rounds, "local": local_rounds},
        "scale": {"instances": count, **scale},
        "dashboard": dashboard,
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\n{os.cpu_count()} cores, Python {platform.python_version()}; written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
