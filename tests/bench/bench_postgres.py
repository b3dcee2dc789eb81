"""dt-trio on PostgreSQL: 1, 2 and 3 sidecars on one hub against one sidecar on sqlite and the
official SDK's in-memory reference server.

    python tests/bench/bench.py --store postgres [--quick] [--rounds N] [--json FILE]

Every server gets SDK worker processes of its own (one per sidecar; this process is only the
client, scheduling round-robin through the sidecars and waiting on the one it scheduled
through), so that 1, 2 and 3 sidecars are measured the same way, and the sqlite sidecar and
the reference the same way as them. Then, on PostgreSQL: how soon a commit on one sidecar
wakes another (store to store, in this process), how long a killed sidecar's work waits for
another to take it over, what the sidecars send the database per orchestration step (hello
cities alone: every statement, the waits' reads and the wake-ups included, over the steps
written), and how often a sidecar asks while idle. The one-server hello-cities runs also
read the CPU each process spent per orchestration (/proc: the server, its SDK worker, this
client, and the PostgreSQL server's processes for the PostgreSQL sidecar when it runs on
this machine). PostgreSQL is a throwaway cluster (or $DT_TRIO_TEST_PG); its version and
settings are in the report.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import trio
from durabletask import client, task, worker

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import _postgres
from bench import (
    commit,
    cpu_seconds,
    fan_out,
    free_port,
    hello_cities,
    machine,
    one_activity,
    percentile,
    proc_stat,
    say_hello,
)

SETTINGS = ("server_version", "fsync", "synchronous_commit", "shared_buffers", "max_connections")
LEASE_TTL = 5.0  # for the takeover measurement


def slow(ctx: task.ActivityContext, seconds: float) -> str:
    time.sleep(seconds)
    return "slow"


def held(ctx: task.OrchestrationContext, seconds: float) -> Any:
    return (yield ctx.call_activity(slow, input=seconds))


def run_worker(address: str) -> None:
    """A worker process (see `workers`): the bench's orchestrations, until SIGTERM."""
    w = worker.TaskHubGrpcWorker(host_address=address)
    for o in (hello_cities, fan_out, one_activity, held):
        w.add_orchestrator(o)
    w.add_activity(say_hello)
    w.add_activity(slow)
    w.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    w.stop()


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("a server exited during start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("a server did not start")


class Servers:
    """`count` servers of `kind` ("postgres", "sqlite" or "reference"), each with a worker
    process; `addresses` to reach them, `logs` of the dt-trio ones."""

    def __init__(self, kind: str, count: int, pg: str, workdir: str, *extra: str) -> None:
        self.kind = kind
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.addresses: list[str] = []
        self.logs: list[str] = []
        hub = _postgres.new_hub()
        for i in range(count):
            port = free_port()
            if kind == "reference":
                code = (
                    "import time; from durabletask.testing import create_test_backend; "
                    f"create_test_backend(port={port}); time.sleep(10**6)"
                )
                cmd = [sys.executable, "-c", code]
            else:
                store = ["--db", os.path.join(workdir, f"bench-{port}.sqlite3")]
                if kind == "postgres":
                    store = ["--db", pg, "--hub", hub, *extra]
                cmd = [sys.executable, "-m", "dt_trio", "--port", str(port), *store]
                cmd += ["--log-level", "INFO", "--no-ui"]
            log_path = os.path.join(workdir, f"{kind}-{i}-{port}.log")
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
            self.procs.append(proc)
            self.logs.append(log_path)
            wait_listening(port, proc)
            self.addresses.append(f"127.0.0.1:{port}")
        for address in self.addresses:
            self.workers.append(self.start_worker(address))

    @staticmethod
    def start_worker(address: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, __file__, "--worker", address],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        """Stop the workers and the servers; keep what the dt-trio PostgreSQL sidecars logged
        they sent as they stopped (`statements`, `round_trips`)."""
        for proc in [*self.workers, *self.procs]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.workers, *self.procs]:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.statements = self.round_trips = self.steps = 0
        pattern = r"(\d+) statements in \d+ transactions \((\d+) round trips\) for (\d+) steps"
        for path in self.logs:
            with open(path) as log:
                text = log.read()
            for found in re.finditer(pattern, text):
                self.statements += int(found.group(1))
                self.round_trips += int(found.group(2))
                self.steps += int(found.group(3))


@contextlib.contextmanager
def servers(kind: str, count: int, pg: str, *extra: str) -> Iterator[Servers]:
    with tempfile.TemporaryDirectory() as workdir:
        running = Servers(kind, count, pg, workdir, *extra)
        try:
            yield running
        finally:
            running.stop()


def hello(clients: list[client.TaskHubGrpcClient], n: int) -> dict[str, float]:
    started = time.perf_counter()
    ids = [
        (c, c.schedule_new_orchestration(hello_cities))
        for i in range(n)
        for c in [clients[i % len(clients)]]
    ]
    latencies = []
    for c, instance_id in ids:
        state = c.wait_for_orchestration_completion(instance_id, timeout=600)
        assert state is not None and state.runtime_status == client.OrchestrationStatus.COMPLETED
        latencies.append((state.last_updated_at - state.created_at).total_seconds() * 1000)
    return {
        "orchestrations_per_s": n / (time.perf_counter() - started),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
    }


def fan(clients: list[client.TaskHubGrpcClient], n: int) -> dict[str, float]:
    """A fan-out of `n` activities through each sidecar at once (its activities run on every
    sidecar's workers), three times: the median rate."""
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        ids = [(c, c.schedule_new_orchestration(fan_out, input=n)) for c in clients]
        for c, instance_id in ids:
            state = c.wait_for_orchestration_completion(instance_id, timeout=600)
            assert state is not None and state.serialized_output == str(n)
        rates.append(n * len(clients) / (time.perf_counter() - started))
    return {"activities_per_s": percentile(rates, 50)}


def postmaster(pg: str) -> int | None:
    """The pid of the PostgreSQL server at `pg` if it runs on this machine (its processes'
    CPU can be read), else None."""
    with psycopg.connect(pg) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    try:
        return int(proc_stat(row[0])[1]) if row is not None else None
    except OSError:
        return None


def cluster_cpu_seconds(pid: int) -> float:
    """The CPU time of a PostgreSQL server so far: the postmaster's, its live children's
    (backends, walwriter...) and that of the children it has waited for."""
    total = cpu_seconds(pid, reaped=True)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(proc_stat(int(entry))[1]) == pid:
                    total += cpu_seconds(int(entry))
            except OSError:  # gone meanwhile
                pass
    return total


def hello_cpu(
    running: Servers, hub: client.TaskHubGrpcClient, pg_pid: int | None, n: int
) -> dict[str, float]:
    """Hello cities through `hub` on the one server of `running`, with the CPU each process
    spent per orchestration (ms): the server, its SDK worker, this client, and PostgreSQL's
    server (when it runs here) for a dt-trio PostgreSQL sidecar."""
    [server], [sdk_worker] = running.procs, running.workers
    database = pg_pid if running.kind == "postgres" else None

    def now() -> dict[str, float]:
        me = os.times()
        spent = {
            "server": cpu_seconds(server.pid),
            "worker": cpu_seconds(sdk_worker.pid),
            "client": me.user + me.system,
        }
        if database is not None:
            spent["postgres"] = cluster_cpu_seconds(database)
        return spent

    before = now()
    result = hello([hub], n)
    after = now()
    for key in before:
        result[f"cpu_ms_{key}"] = (after[key] - before[key]) * 1000 / n
    return result


def throughput(kind: str, count: int, pg: str, quick: bool, pg_pid: int | None) -> dict[str, Any]:
    n_hello, n_fan = (100, 200) if quick else (1000, 1000)
    with servers(kind, count, pg) as running:
        clients = [client.TaskHubGrpcClient(host_address=a) for a in running.addresses]
        try:
            for c in clients:  # warm-up: connections, the workers' first streams
                c.wait_for_orchestration_completion(
                    c.schedule_new_orchestration(one_activity), timeout=60
                )
            results: dict[str, Any] = {
                f"hello cities (n={n_hello})": (
                    hello_cpu(running, clients[0], pg_pid, n_hello)
                    if count == 1
                    else hello(clients, n_hello)
                ),
                f"fan-out/fan-in (n={n_fan} per sidecar)": fan(clients, n_fan),
            }
        finally:
            for c in clients:
                c.close()
    return results


def per_step(count: int, pg: str, n: int) -> dict[str, float]:
    """What `count` sidecars send the database per orchestration step of hello cities (one
    activity result per step): everything, the waits' reads and the wake-ups included, as
    the sidecars count it, over the steps they wrote."""
    with servers("postgres", count, pg) as running:
        clients = [client.TaskHubGrpcClient(host_address=a) for a in running.addresses]
        try:
            hello(clients, n)
        finally:
            for c in clients:
                c.close()
    return {
        "statements": running.statements / running.steps,
        "round_trips": running.round_trips / running.steps,
    }


async def wake_latency(pg: str, samples: int) -> dict[str, float]:
    """Commit on one store, woken on another: from the moment the commit returned until the
    other store's listener hears of the instance (LISTEN/NOTIFY)."""
    from datetime import UTC, datetime

    from dt_trio._core import Status
    from dt_trio._core import _events as ev
    from dt_trio._core import _operations as ops
    from dt_trio._core._state import InstanceState
    from dt_trio._engine import Signals
    from dt_trio._store._postgres import PostgresBackend

    hub = _postgres.new_hub()
    signals = Signals()
    a = PostgresBackend(pg, hub)
    b = PostgresBackend(pg, hub, listener=signals)
    await a.open()
    await b.open()
    latencies = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            with trio.fail_after(10):  # a knows b listens (b greets it): a sends wake-ups
                while not a._peers:  # noqa: ASYNC110 (a flag of the store, no event)
                    await trio.sleep(0.01)
            for i in range(samples):
                now = datetime.now(UTC)
                state = InstanceState(f"w{i}", "o", "e", Status.PENDING, now, now)
                started = ev.execution_started(
                    now, name="o", instance_id=f"w{i}", execution_id="e", input=None
                )
                change = signals.instance_event(f"w{i}")
                await a.apply(ops.start(state, started, now, now))
                committed = time.perf_counter()
                await change.wait()
                latencies.append((time.perf_counter() - committed) * 1000)
                signals.release(f"w{i}", change)
                await trio.sleep(0.005)  # one at a time, not coalesced
            nursery.cancel_scope.cancel()
    finally:
        await a.close()
        await b.close()
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}


def takeover(pg: str, kills: int) -> dict[str, Any]:
    """Two sidecars with a worker each; an activity that sleeps runs on the first, which is
    killed (with its worker) mid-activity: how long until the second finishes the
    orchestration, beyond the activity's own time (it runs again from its start)."""
    seconds = []
    extra = ("--lease-ttl", str(LEASE_TTL))
    activity = 1.0
    with servers("postgres", 2, pg, *extra) as running:
        first, second = (client.TaskHubGrpcClient(host_address=a) for a in running.addresses)
        try:
            for k in range(kills):
                # the first sidecar's worker is connected, and is the only one while the
                # activity starts
                first.wait_for_orchestration_completion(
                    first.schedule_new_orchestration(one_activity), timeout=60
                )
                running.workers[1].terminate()
                running.workers[1].wait(30)
                instance_id = first.schedule_new_orchestration(held, input=activity)
                deadline = time.monotonic() + 30
                while True:  # its first step is committed: the activity runs on that worker
                    state = first.get_orchestration_state(instance_id)
                    if state is not None and state.runtime_status.name == "RUNNING":
                        break
                    assert time.monotonic() < deadline, "the activity did not start"
                    time.sleep(0.01)
                time.sleep(0.2)
                running.procs[0].kill()  # first: alive, it would give the activity back
                killed = time.perf_counter()
                running.workers[0].kill()
                running.workers[1] = running.start_worker(running.addresses[1])
                state = second.wait_for_orchestration_completion(instance_id, timeout=120)
                assert state is not None and state.serialized_output == '"slow"'
                seconds.append(time.perf_counter() - killed - activity)
                if k + 1 < kills:  # the first sidecar again, on its port
                    port = int(running.addresses[0].rsplit(":", 1)[1])
                    cmd = [sys.executable, "-m", "dt_trio", "--port", str(port), "--db", pg,
                           "--hub", _hub_of(running), "--no-ui", *extra]  # fmt: skip
                    running.procs[0] = subprocess.Popen(
                        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                    )
                    wait_listening(port, running.procs[0])
                    running.workers[0] = running.start_worker(running.addresses[0])
        finally:
            first.close()
            second.close()
    return {"lease_ttl_s": LEASE_TTL, "takeover_s": [round(s, 2) for s in seconds]}


def _hub_of(running: Servers) -> str:
    log = open(running.logs[1]).read()
    found = re.search(r"backend started: postgres::\S+#(\w+)", log)
    assert found is not None
    return found.group(1)


def idle(pg: str) -> dict[str, float]:
    """Statements a sidecar with a connected worker sends while nothing happens: two runs of
    different length, the difference per second (start-up and shutdown cancel out)."""
    counts = []
    for seconds in (5.0, 25.0):
        with servers("postgres", 1, pg) as running:
            time.sleep(seconds)
        counts.append(running.statements)
    return {"statements_per_s": (counts[1] - counts[0]) / 20.0}


def postgres_settings(pg: str) -> dict[str, str]:
    with psycopg.connect(pg) as conn:
        return {name: str(conn.execute(f"SHOW {name}").fetchone()[0]) for name in SETTINGS}  # type: ignore[index]


def main(quick: bool, rounds: int, json_path: str | None) -> int:
    """The whole run: throughput in `rounds` interleaved rounds (each round another server
    goes first; medians, with every round kept), then the PostgreSQL-only figures. Written as
    JSON and a markdown table beside it (docs/bench-results/DATE-COMMIT-postgres.json unless
    --quick or --json)."""
    date = datetime.date.today().isoformat()
    at = commit()
    if json_path is None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        json_path = (
            "bench-results-postgres.json"
            if quick
            else os.path.join(root, "docs", "bench-results", f"{date}-{at}-postgres.json")
        )
    report: dict[str, Any] = {
        "date": date,
        "commit": at,
        "machine": {**machine(), "platform": platform.platform()},
        "quick": quick,
        "rounds": rounds,
    }
    with _postgres.server() as pg:
        report["postgres"] = postgres_settings(pg)
        pg_pid = postmaster(pg)
        runs = [("reference", 1), ("sqlite", 1), ("postgres", 1), ("postgres", 2), ("postgres", 3)]
        results: dict[str, list[dict[str, Any]]] = {}
        for r in range(rounds):
            for kind, count in runs[r % len(runs) :] + runs[: r % len(runs)]:
                label = f"{kind} x{count}" if kind == "postgres" else kind
                results.setdefault(label, []).append(throughput(kind, count, pg, quick, pg_pid))
            print(f"round {r + 1} of {rounds} done", file=sys.stderr)
        report["throughput"] = {
            label: {
                workload: {
                    metric: percentile([run[workload][metric] for run in runs_of], 50)
                    for metric in runs_of[0][workload]
                }
                for workload in runs_of[0]
            }
            for label, runs_of in results.items()
        }
        report["each_round"] = results
        report["per_orchestration_step"] = {
            f"postgres x{count}": per_step(count, pg, 100 if quick else 300) for count in (1, 2, 3)
        }
        report["wake_up_across_sidecars"] = trio.run(wake_latency, pg, 100 if quick else 500)
        report["takeover_after_kill_9"] = takeover(pg, 1 if quick else 3)
        report["idle"] = idle(pg)
    table = markdown(report)
    print(json.dumps(report, indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.splitext(json_path)[0] + ".md", "w") as f:
        f.write(table)
    print(table)
    print(f"written to {json_path} and its .md")
    return 0


def markdown(report: dict[str, Any]) -> str:
    """The targets of the PostgreSQL store and every throughput figure, with each round."""
    rounds = report["each_round"]
    hello_key = next(k for k in rounds["reference"][0] if k.startswith("hello"))
    fan_key = next(k for k in rounds["reference"][0] if k.startswith("fan-out"))

    def each(label: str, key: str, metric: str) -> list[float]:
        return [run[key][metric] for run in rounds[label]]

    ratios = [
        p / r
        for p, r in zip(
            each("postgres x1", hello_key, "orchestrations_per_s"),
            each("reference", hello_key, "orchestrations_per_s"),
            strict=True,
        )
    ]
    median = report["throughput"]
    ratio = (
        median["postgres x1"][hello_key]["orchestrations_per_s"]
        / median["reference"][hello_key]["orchestrations_per_s"]
    )
    step = report["per_orchestration_step"]
    wake = report["wake_up_across_sidecars"]
    idle_rate = report["idle"]["statements_per_s"]
    pg = report["postgres"]
    m = report["machine"]
    out = [
        f"PostgreSQL store, {report['date']}, commit {report['commit']}: {m.get('cpu', '')}, "
        f"{m.get('cores')} cores, Python {m.get('python')}; PostgreSQL {pg['server_version']} "
        f"(fsync {pg['fsync']}, synchronous_commit {pg['synchronous_commit']}, shared_buffers "
        f"{pg['shared_buffers']}); {report['rounds']} rounds, medians [min..max].",
        "",
        "| target | figure | goal | met |",
        "| --- | --- | --- | --- |",
        f"| hello cities, 1 sidecar / in-memory reference | {ratio:.2f}x (rounds: "
        f"{', '.join(f'{r:.2f}' for r in ratios)}) | >= 1.0x | {'yes' if ratio >= 1 else 'no'} |",
        f"| cross-sidecar wake-up p50 (p99) | {wake['p50_ms']:.2f} ms ({wake['p99_ms']:.2f} ms) "
        f"| < 5 ms | {'yes' if wake['p50_ms'] < 5 else 'no'} |",
    ]
    for label, figures in step.items():
        trips, statements = figures["round_trips"], figures["statements"]
        out.append(
            f"| round trips per orchestration step, {label} | {trips:.2f} ({statements:.2f} "
            f"statements) | <= 2 | {'yes' if trips <= 2 else 'no'} |"
        )
    out += [
        f"| statements per second while idle, per sidecar | {idle_rate:.2f} | < 2 | "
        f"{'yes' if idle_rate < 2 else 'no'} |",
        "",
        "| server | hello cities /s | p50 ms | fan-out activities /s |",
        "| --- | --- | --- | --- |",
    ]
    for label in rounds:
        rates = each(label, hello_key, "orchestrations_per_s")
        fans = each(label, fan_key, "activities_per_s")
        out.append(
            f"| {label} | {median[label][hello_key]['orchestrations_per_s']:.0f} "
            f"[{min(rates):.0f}..{max(rates):.0f}] | {median[label][hello_key]['p50_ms']:.1f} | "
            f"{median[label][fan_key]['activities_per_s']:.0f} [{min(fans):.0f}..{max(fans):.0f}] |"
        )
    out += [
        "",
        "CPU per hello-cities orchestration, ms, medians (each process's user and system time "
        "from /proc; PostgreSQL: every process of its server):",
        "",
        "| server | server | SDK worker | client | PostgreSQL | all |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label in rounds:
        figures = median[label][hello_key]
        if "cpu_ms_server" not in figures:
            continue
        parts = [figures.get(f"cpu_ms_{p}") for p in ("server", "worker", "client", "postgres")]
        cells = ["" if v is None else f"{v:.2f}" for v in parts]
        total = sum(v for v in parts if v is not None)
        out.append(f"| {label} | {' | '.join(cells)} | {total:.2f} |")
    takeover_s = report["takeover_after_kill_9"]
    out += [
        "",
        f"Takeover after kill -9 (lease time to live {takeover_s['lease_ttl_s']} s): "
        f"{', '.join(f'{t} s' for t in takeover_s['takeover_s'])}.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        run_worker(sys.argv[2])
