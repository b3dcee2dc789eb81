"""Store faults: a full disk, a database locked by another program, a read-only store.

While the store cannot write, callers get UNAVAILABLE with the reason, the sidecar logs the
fault once and keeps serving reads; when the fault clears, the work that waited goes on and
nothing is lost or corrupted. (A second dt-trio on the same file is refused: test_cli.py.)
These are sqlite's faults; PostgreSQL's (a restart, killed connections) are in
test_store_postgres.py.
"""

from __future__ import annotations

import pathlib
import resource
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from _harness import Sidecar, sdk_client, sdk_worker, wait_until
from durabletask import client, task

pytestmark = pytest.mark.sqlite_only

FILE_LIMIT = 6 << 20  # bytes any one file of the store may reach while the "disk" is full
BIG = "x" * (256 << 10)


def echo(ctx: task.OrchestrationContext, value: Any) -> Any:
    return len(value)


@pytest.fixture
def sidecar(tmp_path: pathlib.Path) -> Iterator[Sidecar]:
    sidecar = Sidecar(str(tmp_path / "hub.sqlite3"), tmp_path / "sidecar.log")
    yield sidecar
    if sidecar.proc is not None and sidecar.proc.poll() is None:
        assert sidecar.stop() == 0


def integrity(path: str) -> str:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def test_a_full_disk_answers_unavailable_and_work_resumes_when_space_returns(
    sidecar: Sidecar,
) -> None:
    sidecar.start()
    assert sidecar.proc is not None
    # RLIMIT_FSIZE makes writes past the limit fail with EFBIG, which sqlite reports as
    # "database or disk is full": a full disk, as far as the store can tell. Set from here
    # once the sidecar runs: a limit set between fork and exec (preexec_fn) ran the atfork
    # handlers of this process's gRPC threads in the child, which once killed it at birth.
    resource.prlimit(sidecar.proc.pid, resource.RLIMIT_FSIZE, (FILE_LIMIT, resource.RLIM_INFINITY))
    accepted: list[str] = []
    with sdk_worker(sidecar.address, [echo]):
        c = sdk_client(sidecar.address)
        with pytest.raises(grpc.RpcError) as info:
            for n in range(100):
                accepted.append(c.schedule_new_orchestration(echo, input=BIG, instance_id=f"b{n}"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "disk" in (info.value.details() or "")  # "disk I/O error" or "disk is full"
        assert accepted, "the store took nothing before it was full"
        assert "callers get UNAVAILABLE until it clears" in sidecar.log_text()
        assert c.get_orchestration_state(accepted[0]) is not None  # reads still work
        assert sidecar.proc.poll() is None

        resource.prlimit(
            sidecar.proc.pid,
            resource.RLIMIT_FSIZE,
            (resource.RLIM_INFINITY, resource.RLIM_INFINITY),
        )
        accepted.append(c.schedule_new_orchestration(echo, input=BIG, instance_id="after"))
        for instance_id in accepted:
            state = c.wait_for_orchestration_completion(instance_id, timeout=60)
            assert state is not None
            assert state.runtime_status == client.OrchestrationStatus.COMPLETED
            assert state.serialized_output == str(len(BIG))
    assert "is writable again" in sidecar.log_text()
    assert integrity(sidecar.db) == "ok"


def test_a_store_locked_by_another_program_answers_unavailable_until_released(
    sidecar: Sidecar,
) -> None:
    sidecar.start()
    with sdk_worker(sidecar.address, [echo]):
        c = sdk_client(sidecar.address)
        first = c.schedule_new_orchestration(echo, input="abc")
        c.wait_for_orchestration_completion(first, timeout=30)
        intruder = sqlite3.connect(sidecar.db, isolation_level=None)
        try:
            intruder.execute("BEGIN EXCLUSIVE")  # e.g. a backup tool holding a write lock
            with pytest.raises(grpc.RpcError) as info:
                c.schedule_new_orchestration(echo, input="abcd", instance_id="blocked")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "locked" in (info.value.details() or "")
        finally:
            intruder.execute("ROLLBACK")
            intruder.close()
        second = c.schedule_new_orchestration(echo, input="abcd")
        state = c.wait_for_orchestration_completion(second, timeout=30)
        assert state is not None and state.serialized_output == "4"
        assert c.get_orchestration_state("blocked") is None  # refused means not stored
    wait_until(lambda: "is writable again" in sidecar.log_text(), what="the recovery line")
    assert integrity(sidecar.db) == "ok"


def _immutable(paths: list[str], on: bool) -> bool:
    """chattr +i/-i: writes fail even for root and through open files (a read-only store)."""
    for path in paths:
        done = subprocess.run(
            ["chattr", "+i" if on else "-i", path], capture_output=True, check=False
        )
        if done.returncode != 0:
            return False
    return True


def test_a_store_made_read_only_answers_unavailable_until_writable_again(
    sidecar: Sidecar,
) -> None:
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed: cannot make the store read-only for root")
    sidecar.start()
    files = [sidecar.db, f"{sidecar.db}-wal"]
    with sdk_worker(sidecar.address, [echo]):
        c = sdk_client(sidecar.address)
        first = c.schedule_new_orchestration(echo, input="abc")
        c.wait_for_orchestration_completion(first, timeout=30)
        if not _immutable(files, True):
            _immutable(files, False)
            pytest.skip("this file system does not support the immutable attribute")
        try:
            with pytest.raises(grpc.RpcError) as info:
                c.schedule_new_orchestration(echo, input="abcd", instance_id="refused")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert c.get_orchestration_state(first) is not None  # reads go on
        finally:
            _immutable(files, False)
        second = c.schedule_new_orchestration(echo, input="abcd")
        state = c.wait_for_orchestration_completion(second, timeout=30)
        assert state is not None and state.serialized_output == "4"
        assert c.get_orchestration_state("refused") is None
    assert "callers get UNAVAILABLE until it clears" in sidecar.log_text()
    assert integrity(sidecar.db) == "ok"
