"""Run the official Durable Task Python SDK's end-to-end suites against dt-trio.

    python tests/sdk_suites/run_official.py --repo PATH [SUITE ...] [-- PYTEST ARGS]

PATH is a clone (or bare git directory) of microsoft/durabletask-python; SUITE names files
under its tests/durabletask/ (default: test_orchestration_e2e.py), e.g.
entities/test_function_based_entities_e2e.py. The suites start the SDK's
in-memory test server through `durabletask.testing.create_test_backend`; here that function
starts a dt-trio sidecar (`python -m dt_trio --db ""`) on the port the suite chose instead, and
the suite runs unchanged. Nothing of theirs is copied into this repository: the files are read
from PATH into a temporary directory for the run.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

SUPPORT = ("tests/__init__.py", "tests/durabletask/__init__.py", "tests/durabletask/_port_utils.py")

CONFTEST = '''
import socket, subprocess, sys, time
import durabletask.testing


class _DtTrioSidecar:
    """Stands in for the SDK's in-memory test server: a dt-trio process on the same port."""

    def __init__(self, port):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dt_trio", "--port", str(port), "--db", "", "--no-ui",
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
        ).returncode


if __name__ == "__main__":
    sys.exit(main())
