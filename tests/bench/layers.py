"""Where dt-trio's time goes, per layer: the profile behind the performance targets not met.

    python tests/bench/layers.py [--quick] [--out FILE] [--samples DIR] [--store postgres]
    (nox -s profile)

Three workloads, each profiled alone in a process of its own with the py-spy sampler
(attached once the workload is warm, detached when it ends):

- the sidecar on an sqlite file, the official SDK's worker and client in this process:
  1,000 hello cities started one after another while the worker runs them, then awaited
  (the bench's hello-cities workload: the starts meet a busy worker);
- the same sidecar: one fan-out/fan-in of 1,000 activities, three times;
- the local API (no gRPC) in an interpreter of its own: 3,000 hello cities started at once.

For each: the process's CPU per orchestration (or activity) from /proc, user and system, split
into the event loop's thread and the store's threads; then the samples taken while a thread
held the GIL (the Python work, and the C work done holding it, such as protobuf's), each
counted in the layer of its deepest frame in dt_trio or trio (the standard library counts in
its caller's layer). The layers: trio (its scheduler, threads and sockets), the gRPC
transport and service, HTTP/2 framing, the engine (dispatcher, processors, executors), the
core (step planning, commits), the store's Python, the local API's orchestrator runtime
(replay) and its client. The stores' SQL runs without the GIL: it shows in the store
threads' CPU, not in the samples.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import _postgres
from bench import (
    commit,
    fan_out,
    hello_cities,
    local,
    local_fan_out,
    local_hello_cities,
    one_activity,
    say_hello,
    sequential,
    server,
    timed_starts,
)
from durabletask import client, worker

import dt_trio

SAMPLES_PER_S = 250
# (a part of a source file's path, its layer): the first that matches, in this order
LAYERS = (
    ("/dt_trio/_grpc/_http2", "HTTP/2 framing"),
    ("/dt_trio/_grpc/", "gRPC transport and service"),
    ("/dt_trio/_engine/", "engine"),
    ("/dt_trio/_core/", "core"),
    ("/dt_trio/_store/", "store (Python)"),
    ("/psycopg", "psycopg"),
    ("/dt_trio/_local/_replay", "replay (local orchestrator runtime)"),
    ("/dt_trio/", "dt_trio, other"),
    ("/trio/", "trio"),
    ("/outcome/", "trio"),
    ("/google/protobuf/", "protobuf"),
)


def layer_of(frames: list[str]) -> str:
    """The layer of a sample: its deepest frame with a known layer (py-spy writes a frame as
    `function (path:line)`)."""
    for frame in reversed(frames):
        path = frame.rpartition(" (")[2]
        for part, layer in LAYERS:
            if part in path:
                return layer
    return "other"


def read_samples(path: str, pid: int) -> tuple[collections.Counter[str], int, int]:
    """py-spy's raw output (`thread (tid): name;frame;...;frame count` per line) as samples
    per layer, and how many were in the event loop's thread (the process's first) and in
    the others."""
    layers: collections.Counter[str] = collections.Counter()
    loop = others = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            n = int(count)
            layers[layer_of(frames[1:])] += n
            if frames[0].startswith(f"thread ({pid})"):
                loop += n
            else:
                others += n
    return layers, loop, others


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far, user and system, of the event loop's thread (the first) and of
    the process's other threads."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = {"loop_user": 0.0, "loop_system": 0.0, "others_user": 0.0, "others_system": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile (its time is lost to this count)
        who = "loop" if int(tid) == pid else "others"
        cpu[f"{who}_user"] += int(fields[11]) / tick
        cpu[f"{who}_system"] += int(fields[12]) / tick
    return cpu


@contextmanager
def sampled(pid: int, keep: str | None) -> Iterator[dict[str, Any]]:
    """Sample `pid` with py-spy while the block runs; the profile is in the yielded dict.
    `keep`: where to copy py-spy's raw samples (for a flame graph: flamegraph.pl reads them)."""
    result: dict[str, Any] = {}
    before = thread_cpu(pid)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "samples.txt")
        spy = subprocess.Popen(
            [
                *("py-spy", "record", "--pid", str(pid), "--output", raw, "--format", "raw"),
                *("--rate", str(SAMPLES_PER_S), "--threads", "--gil", "--nonblocking"),
                "--full-filenames",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)  # attached
        try:
            yield result
        finally:
            after = thread_cpu(pid)
            spy.send_signal(signal.SIGINT)
            _, err = spy.communicate(timeout=60)
        if not os.path.exists(raw):
            raise RuntimeError(f"py-spy wrote no samples: {err.decode(errors='replace')}")
        if keep:
            shutil.copy(raw, keep)
        result["cpu"] = {k: after[k] - before[k] for k in after}
        result["layers"], result["loop_samples"], result["other_samples"] = read_samples(raw, pid)


def sidecar_profiles(
    quick: bool, keep: str | None, db: str | None = None
) -> dict[str, dict[str, Any]]:
    """The sidecar's hello cities and fan-out, on a file of its own or on `db`."""
    n_hello, n_fan = (200, 200) if quick else (1000, 1000)
    profiles = {}
    with server("dt-trio", db=db) as s:
        c = client.TaskHubGrpcClient(host_address=s.address)
        w = worker.TaskHubGrpcWorker(host_address=s.address)
        try:
            for o in (hello_cities, fan_out, one_activity):
                w.add_orchestrator(o)
            w.add_activity(say_hello)
            w.start()
            sequential(one_activity)(c, 20, s)  # warm: connections, imports, caches
            with sampled(s.pid, keep and os.path.join(keep, "sidecar-hello.txt")) as hello:
                ids, _ = timed_starts(c, hello_cities, n_hello)
                for instance_id in ids:
                    c.wait_for_orchestration_completion(instance_id, timeout=600)
            hello["units"] = n_hello
            profiles["sidecar: hello cities, per orchestration"] = hello
            with sampled(s.pid, keep and os.path.join(keep, "sidecar-fan-out.txt")) as fan:
                for _ in range(3):
                    done = c.wait_for_orchestration_completion(
                        c.schedule_new_orchestration(fan_out, input=n_fan), timeout=600
                    )
                    assert done is not None and done.serialized_output == str(n_fan)
            fan["units"] = 3 * n_fan
            profiles["sidecar: fan-out, per activity"] = fan
        finally:
            c.close()
            w.stop()
    return profiles


def local_profile(quick: bool, keep: str | None) -> dict[str, Any]:
    """The local API's hello cities in a child interpreter (`--local-child`), sampled from
    the moment it is warm until it is done."""
    n = 200 if quick else 3000  # (the local API runs 1,000 in under a second: few samples)
    child = subprocess.Popen(
        [sys.executable, __file__, "--local-child", str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        if child.stdout.readline().strip() != "warm":
            raise RuntimeError("the local-API child did not start")
        with sampled(child.pid, keep and os.path.join(keep, "local-hello.txt")) as profile:
            child.stdin.write("go\n")
            child.stdin.flush()
            if child.stdout.readline().strip() != "done":
                raise RuntimeError("the local-API child failed")
        profile["units"] = n
    finally:
        child.stdin.close()
        child.wait(60)
    return profile


async def local_child(n: int) -> None:
    """In the child: a hub on an sqlite file, warmed up; on a line of stdin, `n` hello
    cities started at once and awaited."""
    with tempfile.TemporaryDirectory() as tmp:
        async with dt_trio.open_task_hub(os.path.join(tmp, "p.sqlite3"), registry=local) as c:
            for _ in range(20):
                await c.wait_for_completion(await c.schedule(local_hello_cities))
            await c.wait_for_completion(await c.schedule(local_fan_out, 100))
            print("warm", flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)
            ids: list[str] = []

            async def schedule_one() -> None:
                ids.append(await c.schedule(local_hello_cities))

            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(schedule_one)
            for instance_id in ids:
                await c.wait_for_completion(instance_id)
            print("done", flush=True)


def markdown(profiles: dict[str, dict[str, Any]]) -> str:
    names = list(profiles)
    lines = [
        f"Profile of {time.strftime('%Y-%m-%d')}, commit {commit()}, "
        f"`python3 -m nox -s profile`: {os.cpu_count()} cores; py-spy at {SAMPLES_PER_S} "
        "samples/s.",
        "",
        "| CPU, ms per unit | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    rows: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
        ("event loop thread, user", lambda p: p["cpu"]["loop_user"]),
        ("event loop thread, system", lambda p: p["cpu"]["loop_system"]),
        ("store threads, user", lambda p: p["cpu"]["others_user"]),
        ("store threads, system", lambda p: p["cpu"]["others_system"]),
        ("all", lambda p: sum(p["cpu"].values())),
    ]
    for label, get in rows:
        cells = [f"{get(profiles[n]) * 1000 / profiles[n]['units']:.3f}" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| share of the samples holding the GIL | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    every = sorted(
        {layer for p in profiles.values() for layer in p["layers"]},
        key=lambda layer: -sum(p["layers"][layer] for p in profiles.values()),
    )
    for layer in [*every, "(in the event loop's thread)"]:
        cells = []
        for n in names:
            p = profiles[n]
            total = sum(p["layers"].values()) or 1
            part = p["loop_samples"] if layer.startswith("(") else p["layers"][layer]
            cells.append(f"{100 * part / total:.1f}%")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", help="also write the markdown tables to this file")
    parser.add_argument("--samples", help="keep py-spy's raw samples in this folder")
    parser.add_argument(
        "--store",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="the sidecar's store; postgres: a throwaway cluster (or $DT_TRIO_TEST_PG), and "
        "no local-API profile",
    )
    parser.add_argument("--local-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.local_child:
        trio.run(local_child, args.local_child)
        return 0
    if args.samples:
        os.makedirs(args.samples, exist_ok=True)
    if args.store == "postgres":
        with _postgres.server() as address:
            profiles = sidecar_profiles(args.quick, args.samples, address)
    else:
        profiles = sidecar_profiles(args.quick, args.samples)
        profiles["local API: hello cities, per orchestration"] = local_profile(
            args.quick, args.samples
        )
    text = markdown(profiles)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
