"""Run the official Durable Task Python SDK's end-to-end suites against dt-trio.

    python tests/sdk_suites/run_official.py --repo PATH [--store postgres] [SUITE ...]
        [-- PYTEST ARGS]

PATH is a clone (or bare git directory) of microsoft/durabletask-python; SUITE names files
under its tests/durabletask/ (default: test_orchestration_e2e.py), e.g.
entities/test_function_based_entities_e2e.py. The suites start the SDK's
in-memory test server through `durabletask.testing.create_test_backend`; here that function
starts a dt-trio sidecar (`python -m dt_trio --db ""`) on the port the suite chose instead, and
the suite runs unchanged. With `--store postgres`, every such sidecar has a task hub of its own
on PostgreSQL (a throwaway cluster for the run, or the server $DT_TRIO_TEST_PG) instead of an
sqlite store in memory. Nothing of theirs is copied into this repository: the files are read
from PATH into a temporary directory for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import _postgres  # (the tests' PostgreSQL, beside this folder)

SUPPORT = ("tests/__init__.py", "tests/durabletask/__init__.py", "tests/durabletask/_port_utils.py")

CONFTEST = '''
import os, socket, subprocess, sys, time, uuid
import durabletask.testing


def _store():
    """An sqlite store in memory, or a hub of its own on the PostgreSQL server of the run."""
    address = os.environ.get("DT_TRIO_SUITE_DB")
    if not address:
        return ["--db", ""]
    return ["--db", address, "--hub", "s" + uuid.uuid4().hex[:12]]


class _DtTrioSidecar:
    """Stands in for the SDK's in-memory test server: a dt-trio process on the same port."""

    def __init__(self, port):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dt_trio", "--port", str(port), *_store(), "--no-ui",
             "--log-level", "WARNING"])
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("dt-trio did not start")
                time.sleep(0.02)

    def stop(self, grace=None):
        self.proc.terminate()
        self.proc.wait(20)

    def reset(self):
        pass


def create_test_backend(port=50051, max_history_size=10000):
    return _DtTrioSidecar(port)


durabletask.testing.create_test_backend = create_test_backend
'''


def read(repo: pathlib.Path, path: str) -> str:
    if (repo / path).exists():
        return (repo / path).read_text()
    out = subprocess.run(
        ["git", "-C", str(repo), "show", f"HEAD:{path}"], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"{path} is not in {repo}: {out.stderr.strip()}")
    return out.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, type=pathlib.Path)
    parser.add_argument(
        "--store", choices=("sqlite", "postgres"), default="sqlite",
        help="the sidecars' store: sqlite in memory (default), or PostgreSQL",
    )  # fmt: skip
    parser.add_argument("suites", nargs="*", default=["test_orchestration_e2e.py"])
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    pytest_args = argv[split + 1 :]
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for path in (*SUPPORT, *(f"tests/durabletask/{s}" for s in args.suites)):
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.write_text(read(args.repo, path))
            except SystemExit:
                if path in SUPPORT:
                    target.write_text("")
                else:
                    raise
        (root / "conftest.py").write_text(CONFTEST)
        suites = [f"tests/durabletask/{s}" for s in args.suites]
        for suite in suites:  # suites in sub-packages (entities/...) import as packages
            for package in (root / suite).parents:
                if package == root / "tests":
                    break
                (package / "__init__.py").touch()
        with _store(args.store) as env:
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-p",
                    "no:cacheprovider",
                    "-q",
                    "-rfE",
                    "--rootdir",
                    tmp,
                    *suites,
                    *pytest_args,
                ],
                cwd=tmp,
                env={**os.environ, **env},
            ).returncode


@contextlib.contextmanager
def _store(kind: str) -> Iterator[dict[str, str]]:
    """What the sidecars' environment needs for `kind`: for PostgreSQL, a server's address
    (a throwaway cluster for the run, or $DT_TRIO_TEST_PG)."""
    if kind != "postgres":
        yield {}
        return
    with _postgres.server() as address:
        yield {"DT_TRIO_SUITE_DB": address}


if __name__ == "__main__":
    sys.exit(main())
