"""The bench's no-op server (tests/bench/noop.py) runs the bench's kinds of orchestration for
the official SDK, with the fewest steps: what the bench measures against it is that work."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from _harness import sdk_client, sdk_worker, wait_until
from durabletask import client, task

pytestmark = pytest.mark.store_independent

NOOP = pathlib.Path(__file__).parent / "bench" / "noop.py"
STEPS: list[str] = []  # one entry per orchestrator run (first run or replay), by name


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


@pytest.fixture
def noop_address() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen([sys.executable, str(NOOP), "--port", str(port)])
    try:
        wait_until(lambda: listening(port), timeout=20, what="the no-op server")
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def greet(ctx: task.ActivityContext, name: str) -> str:
    return f"Hello, {name}!"


def fail(ctx: task.ActivityContext, _: Any) -> None:
    raise ValueError("no")


def in_sequence(ctx: task.OrchestrationContext, _: Any) -> Any:
    STEPS.append("in_sequence")
    out = []
    for name in ("a", "b", "c"):
        out.append((yield ctx.call_activity(greet, input=name)))
    return out


def fan_out(ctx: task.OrchestrationContext, n: int) -> Any:
    STEPS.append("fan_out")
    return sorted((yield task.when_all([ctx.call_activity(greet, input=str(i)) for i in range(n)])))


def failing(ctx: task.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.call_activity(fail))


def test_noop_server_runs_the_bench_orchestrations_with_the_fewest_steps(
    noop_address: str,
) -> None:
    STEPS.clear()
    orchestrators = [in_sequence, fan_out, failing]
    with sdk_worker(noop_address, orchestrators, [greet, fail]):
        c = sdk_client(noop_address)
        try:
            first = c.schedule_new_orchestration(in_sequence)
            second = c.schedule_new_orchestration(fan_out, input=30)
            third = c.schedule_new_orchestration(failing)
            done = [
                c.wait_for_orchestration_completion(i, timeout=30) for i in (first, second, third)
            ]
        finally:
            c.close()
    sequence, fan, failed = done
    assert sequence is not None and fan is not None and failed is not None
    assert sequence.runtime_status == client.OrchestrationStatus.COMPLETED
    assert sequence.serialized_output == '["Hello, a!", "Hello, b!", "Hello, c!"]'
    assert sequence.created_at < sequence.last_updated_at
    assert fan.serialized_output is not None and fan.serialized_output.count("Hello") == 30
    # a step per activity awaited in turn; a fan-out steps once out and once in
    assert STEPS.count("in_sequence") == 4
    assert STEPS.count("fan_out") == 2
    assert failed.runtime_status == client.OrchestrationStatus.FAILED
    assert failed.failure_details is not None
    assert failed.failure_details.message.endswith("Activity task #1 failed: no")
