"""`--durability full`: every commit is synced to disk before anyone hears of it; `normal`
(the default) syncs only at checkpoints."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from _harness import Sidecar, sdk_client, wait_until
from durabletask import task

import dt_trio
from dt_trio._store import Durability, SqliteBackend

pytestmark = pytest.mark.sqlite_only


def noop(ctx: task.OrchestrationContext, _: None) -> None:
    return None


def traced(pid: int) -> bool:
    """Every thread of `pid` has a tracer attached."""
    tasks = pathlib.Path(f"/proc/{pid}/task")
    for status in tasks.glob("*/status"):
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
        if int(fields["TracerPid"]) == 0:
            return False
    return True


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to see the syncs")
@pytest.mark.parametrize("durability", ["normal", "full"])
def test_full_durability_syncs_every_start_before_answering(
    tmp_path: pathlib.Path, durability: str
) -> None:
    sidecar = Sidecar(
        str(tmp_path / "hub.sqlite3"), tmp_path / "log.txt", "--durability", durability
    ).start()
    assert sidecar.proc is not None
    trace = tmp_path / "syncs.txt"
    pid = sidecar.proc.pid
    strace = ["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(trace)]
    tracer = subprocess.Popen([*strace, "-p", str(pid)], stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: traced(pid), what="strace attached")
        c = sdk_client(sidecar.address)
        for _ in range(5):
            c.schedule_new_orchestration(noop)  # answered once its start is committed
        c.close()
    finally:
        tracer.terminate()  # detaches, the sidecar runs on
        tracer.wait(10)
        assert sidecar.stop() == 0
    syncs = [line for line in trace.read_text().splitlines() if "sync(" in line]
    if durability == "full":
        assert len(syncs) >= 5
    else:
        assert syncs == []  # five small commits: no checkpoint, no sync


@pytest.mark.parametrize("durability", list(Durability))
async def test_the_store_file_is_synced_as_asked(
    tmp_path: pathlib.Path, durability: Durability
) -> None:
    store = SqliteBackend(str(tmp_path / "hub.sqlite3"), durability=durability)
    await store.open()
    try:
        level = await store._db.write(lambda conn: conn.execute("PRAGMA synchronous").fetchone())
    finally:
        await store.close()
    assert level[0] == {Durability.NORMAL: 1, Durability.FULL: 2}[durability]


async def test_a_memory_store_cannot_be_fully_durable() -> None:
    registry = dt_trio.Registry()
    with pytest.raises(ValueError, match="durability full needs a store file"):
        async with dt_trio.open_task_hub("", registry=registry, durability=Durability.FULL):
            pass


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--db", "", "--durability", "full"], "--durability full needs a store file"),
        (["--durability", "fsync"], "invalid Durability value: 'fsync'"),
    ],
)
def test_the_command_refuses_a_durability_it_cannot_give(args: list[str], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dt_trio", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        timeout=30,
    )
    assert out.returncode == 2
    assert message in out.stderr
