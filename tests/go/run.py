"""durabletask-go's own client and worker against dt-trio: builds tests/go/main.go with the SDK's
`client` and `task` packages, starts a sidecar (see `Sidecar`), runs the program against it and
stops the sidecar, which must exit cleanly and log no error (`nox -s go` calls this).

    python tests/go/run.py --sdk DURABLETASK_GO --semaphore MARUSAMA_SEMAPHORE

Both are git repositories (bare or not) or source trees. There is no Go module proxy here, so
the build is in GOPATH mode: the two sources are copied into a temporary GOPATH, and every other
import comes from Debian's Go packages under /usr/share/gocode. A Go older than the SDK's go.mod
asks for (Debian 12 has 1.19) gets the SDK patched in that copy where it uses newer library
calls (`_OLD_GO_PATCHES`); the program uses only what both have.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
DEBIAN_GOPATH = "/usr/share/gocode"
LISTENING = re.compile(r"server listening at (\S+):(\d+)")

# (go minor version that has the call, file, text, replacement), each applied below that version
_OLD_GO_PATCHES: list[tuple[int, str, str | re.Pattern[str], str]] = [
    # log/slog (Go 1.21): the SDK's optional slog adapter, which nothing here uses, goes
    (21, "backend/logger.go", '\t"log/slog"\n', ""),
    (21, "backend/logger.go", re.compile(r"\n// slogLogger adapts.*", re.S), "\n"),
    (21, "backend/logger.go", '\t"fmt"\n', ""),
    # errors.Join (Go 1.20), in the retry path when the retry timer fails: one %w instead
    (
        20,
        "task/orchestrator.go",
        "errors.Join(timerErr, err)",
        'fmt.Errorf("%v: %w", timerErr, err)',
    ),
]


def _copy(source: pathlib.Path, into: pathlib.Path) -> str:
    """Copy a git repository's HEAD (or a plain source tree) to `into`; return the commit, or ''."""
    is_git = (source / ".git").exists() or (source / "HEAD").is_file()
    if not is_git:
        shutil.copytree(source, into)
        return ""
    subprocess.run(["git", "clone", "--quiet", str(source), str(into)], check=True)
    head = subprocess.run(
        ["git", "-C", str(into), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    )
    return head.stdout.strip()


def _go_minor(env: dict[str, str]) -> int:
    version = subprocess.run(
        ["go", "env", "GOVERSION"], check=True, capture_output=True, text=True, env=env
    ).stdout
    match = re.match(r"go1\.(\d+)", version)
    return int(match.group(1)) if match else 1000  # a development build: assume new


def _patch(sdk: pathlib.Path, minor: int) -> list[str]:
    """Apply the patches this Go needs; return what was patched."""
    done = []
    for since, name, old, new in _OLD_GO_PATCHES:
        if minor >= since:
            continue
        path = sdk / name
        text = path.read_text()
        if isinstance(old, re.Pattern):
            patched = old.sub(new, text, count=1)
        else:
            patched = text.replace(old, new, 1)
        if patched == text:
            raise SystemExit(f"go 1.{minor}: cannot patch {name} (no {old!r} in this SDK)")
        path.write_text(patched)
        done.append(name)
    return sorted(set(done))


def build(sdk: pathlib.Path, semaphore: pathlib.Path, work: pathlib.Path) -> pathlib.Path:
    """The program, built against copies of the SDK and semaphore in a GOPATH under `work`."""
    gopath = work / "gopath"
    src = gopath / "src" / "github.com"
    commit = _copy(sdk, src / "microsoft" / "durabletask-go")
    _copy(semaphore, src / "marusama" / "semaphore")
    env = {**os.environ, "GOPATH": f"{gopath}:{DEBIAN_GOPATH}", "GO111MODULE": "off"}
    env.pop("GOFLAGS", None)
    minor = _go_minor(env)
    patched = _patch(src / "microsoft" / "durabletask-go", minor)
    print(
        f"durabletask-go {commit or sdk} with go 1.{minor}"
        + (f", patched: {', '.join(patched)}" if patched else ""),
        flush=True,
    )
    program = work / "program"
    program.mkdir()
    shutil.copy(HERE / "main.go", program / "main.go")
    started = time.monotonic()
    command = ["go", "build", "-o", str(work / "gosdk"), "."]
    subprocess.run(command, cwd=program, env=env, check=True)
    print(f"built in {time.monotonic() - started:.1f} s", flush=True)
    return work / "gosdk"


class Sidecar:
    """`python -m dt_trio` on a free port, without the dashboard, on an sqlite store in memory
    or on a hub of its own on the PostgreSQL server $DT_TRIO_TEST_PG names."""

    def __init__(self) -> None:
        postgres = os.environ.get("DT_TRIO_TEST_PG")
        store = ["--db", postgres, "--hub", f"go{os.getpid()}"] if postgres else ["--db", ""]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dt_trio", "--port", "0", *store, "--no-ui"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.address = ""
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if match := LISTENING.search(line):
                self.address = f"127.0.0.1:{match.group(2)}"
            if self.address and "activity-processor: waiting" in line:
                self._ready.set()
        self._ready.set()  # it exited: wait() sees no address

    def wait(self) -> str:
        if not self._ready.wait(30) or self.proc.poll() is not None:
            raise SystemExit("dt-trio did not start:\n" + "".join(self.log))
        return self.address

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self._reader.join()
        return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdk", type=pathlib.Path, required=True, help="durabletask-go's source")
    parser.add_argument(
        "--semaphore", type=pathlib.Path, required=True, help="marusama/semaphore's source"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dt-trio-go-") as tmp:
        program = build(args.sdk, args.semaphore, pathlib.Path(tmp))
        sidecar = Sidecar()
        try:
            address = sidecar.wait()
            started = time.monotonic()
            ran = subprocess.run([str(program), address], timeout=120, check=False)
            print(f"ran in {time.monotonic() - started:.1f} s", flush=True)
        finally:
            code = sidecar.stop()
    problems = [line for line in sidecar.log if " ERROR " in line or "Traceback" in line]
    if code != 0 or problems:
        print(f"dt-trio exited with {code}:\n" + "".join(sidecar.log), file=sys.stderr)
        return 1
    return ran.returncode


if __name__ == "__main__":
    sys.exit(main())
