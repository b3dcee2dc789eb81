"""A real PostgreSQL for the tests: a throwaway cluster, or the server `DT_TRIO_TEST_PG` names.

The cluster is made with Debian's binaries as the `postgres` user (initdb refuses root) in a
temporary directory outside /root (which postgres cannot read), listens on 127.0.0.1 on a free
port with fsync off, and is stopped by its pid. Nothing here imports dt_trio.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator

ENV_SERVER = "DT_TRIO_TEST_PG"  # an existing server to use instead: postgresql://user@host/db


def bin_dir() -> pathlib.Path | None:
    """Where initdb and pg_ctl are: $PG_BIN, Debian's newest version, or the PATH."""
    if os.environ.get("PG_BIN"):
        return pathlib.Path(os.environ["PG_BIN"])
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(pathlib.Path(p).parts[-3]),
    )
    if debian:
        return pathlib.Path(debian[-1]).parent
    found = shutil.which("initdb")
    return pathlib.Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Cluster:
    """A PostgreSQL cluster of its own, on 127.0.0.1:`port`; `address` connects to it."""

    def __init__(self) -> None:
        found = bin_dir()
        if found is None:
            raise RuntimeError(
                "PostgreSQL's initdb was not found: install it (apt-get install -y postgresql), "
                f"set PG_BIN to its directory, or set {ENV_SERVER} to a server's address"
            )
        self.bin = found
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="dt-trio-pg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.port = 0
        self.pid = 0
        self._as_postgres = os.geteuid() == 0

    @property
    def address(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(a) for a in args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")

    def init(self) -> Cluster:
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._run(
            self.bin / "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        return self

    def start(self, port: int = 0) -> Cluster:
        """Start the server (again, after `kill`, on the same port if `port` is 0 and it had
        one); returns once it accepts connections."""
        self.port = port or self.port or _free_port()
        # fsync off: a crash of the machine may lose data, a crash of the server (`kill`) may
        # not, so commits still reach the operating system before they are acknowledged.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} "
            "-c fsync=off -c full_page_writes=off "
            "-c max_connections=300 -c shared_buffers=64MB"
        )
        self._run(
            self.bin / "pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        return self

    def kill(self) -> None:
        """Stop at once, as a crash would (`pg_ctl -m immediate`): clients lose their
        connections and the next start recovers."""
        self._run(self.bin / "pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self.pid = 0

    def stop(self) -> None:
        """Fast shutdown through the postmaster's pid, then the directory is removed."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGINT)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.02)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            self.pid = 0
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    """A throwaway cluster, started for the body and stopped and removed after it."""
    made = Cluster()
    try:
        yield made.init().start()
    finally:
        made.stop()


@contextlib.contextmanager
def server() -> Iterator[str]:
    """The address of a server for the tests: `DT_TRIO_TEST_PG`, or a throwaway cluster's."""
    given = os.environ.get(ENV_SERVER)
    if given:
        yield given
        return
    with cluster() as made:
        yield made.address


def run(command: list[str]) -> int:
    """`command` with DT_TRIO_TEST_PG naming a server: the one given, or a throwaway cluster
    made for it (`python tests/_postgres.py COMMAND...`)."""
    with server() as address:
        return subprocess.run(command, env={**os.environ, ENV_SERVER: address}).returncode


# The hubs this process named (see `drop_hubs`).
_named: list[str] = []


def new_hub() -> str:
    """A hub name no other test uses (each test's store gets a schema of its own)."""
    _named.append(f"t{uuid.uuid4().hex[:12]}")
    return _named[-1]


def drop_hubs(address: str) -> None:
    """Drop the schemas of the hubs this process named (on a server that outlives the run)."""
    import psycopg

    with psycopg.connect(address, autocommit=True) as conn:
        for hub in _named:
            conn.execute(f'DROP SCHEMA IF EXISTS "dt_trio_{hub}" CASCADE')
    _named.clear()


if __name__ == "__main__":
    import sys

    sys.exit(run(sys.argv[1:]))
