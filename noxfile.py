"""Developer sessions: `nox` runs the linter, the type checker, the tests (Python and JavaScript
SDKs, the dashboard in a browser) and a small crash torture; `nox -s NAME` the rest."""

from __future__ import annotations

import glob
import os
import shutil

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "generations", "browser", "js", "torture"]
nox.options.reuse_existing_virtualenvs = True


@nox.session(python="3.11")
@nox.parametrize("store", ["sqlite", "postgres"])
def tests(session: nox.Session, store: str) -> None:
    """The whole test suite: core, store, gRPC and end-to-end with the official SDK, on the
    sqlite store and on PostgreSQL (a throwaway cluster, or the server $DT_TRIO_TEST_PG)."""
    session.install("-e", ".[test]")
    if store == "postgres":
        _need_postgres(session)
    session.run(
        "pytest", "--ignore=tests/browser", *session.posargs, env={"DT_TRIO_TEST_STORE": store}
    )


def _need_postgres(session: nox.Session) -> None:
    """PostgreSQL's server binaries for the tests' throwaway clusters: Debian's package, installed
    here if missing (as root, the way CI runs)."""
    if os.environ.get("DT_TRIO_TEST_PG") or os.environ.get("PG_BIN"):
        return
    if glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb"):
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        session.error(
            "the PostgreSQL tests need its server: apt-get install postgresql (or set PG_BIN to "
            "its bin directory, or DT_TRIO_TEST_PG to a server's address)"
        )
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.run("apt-get", "update", "-q", external=True, env=env)
    session.run("apt-get", "install", "-y", "-q", "postgresql", external=True, env=env)


@nox.session(python="3.11")
def browser(session: nox.Session) -> None:
    """The dashboard in Debian's Chromium, driven by Playwright (installs chromium with
    apt-get where it is missing): -- [pytest args] [--screenshots DIR]."""
    if shutil.which("chromium") is None:
        if shutil.which("apt-get") is None:
            session.error("chromium is missing and there is no apt-get to install it with")
        session.run("apt-get", "update", "-qq", external=True)
        session.run("apt-get", "install", "-y", "-qq", "chromium", external=True)
    session.install("-e", ".[test]", "playwright>=1.50,<2")
    session.run("pytest", "tests/browser", *session.posargs)


@nox.session(python="3.11")
def generations(session: nox.Session) -> None:
    """dt-trio with the Python SDK 0.1.0, of the protocol generation before completion tokens
    and health pings (durabletask-go's worker answers as it does)."""
    session.install("-e", ".", "pytest>=8", "pytest-trio>=0.8", "durabletask==0.1.0")
    session.run("pytest", "tests/generations/old_python_sdk.py", *session.posargs)


@nox.session(python="3.11")
def torture(session: nox.Session) -> None:
    """kill -9 the sidecar again and again under load; nothing may be lost. Small by default:
    -- --orchestrations N --kills K [--seed S] [--json FILE] for a longer run; -- --store
    postgres --sidecars 3 for several sidecars on PostgreSQL, one killed at a time."""
    session.install("-e", ".[test]")
    if "postgres" in session.posargs:
        _need_postgres(session)
    session.run("python", "tests/torture/torture.py", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff: the rules and the format of pyproject.toml."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", "dt_trio", "tests", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "dt_trio", "tests", "examples", "noxfile.py")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy, strict, on dt_trio/ and tests/ (pyproject.toml says where the tests relax it)."""
    session.install(
        "-e",
        ".[test,otel]",
        "mypy==2.4.1",
        "types-protobuf",
        "types-grpcio",
        "types-grpcio-health-checking",
        "playwright>=1.50,<2",  # (its Python package only: the browser tests' types)
    )
    session.run("mypy")


@nox.session(python="3.11")
def protos(session: nox.Session) -> None:
    """Regenerate dt_trio/_proto from protos/ (protobuf + purerpc stubs)."""
    session.install("grpcio-tools==1.85.1", "purerpc==0.8.0")
    session.run("python", "protos/generate.py")


@nox.session(python="3.11")
def sdk_suites(session: nox.Session) -> None:
    """The official SDK's e2e suites against dt-trio: -- --repo PATH [--store postgres]
    [SUITE ...] (sqlite in memory by default; each suite's sidecar a hub of its own on a
    throwaway PostgreSQL cluster with --store postgres)."""
    if "--repo" not in session.posargs:
        session.skip(
            "give a clone of microsoft/durabletask-python: nox -s sdk_suites -- --repo PATH"
        )
    # the async suite's tests are asyncio coroutines
    session.install("-e", ".[test]", "pytest-asyncio")
    if "postgres" in session.posargs:
        _need_postgres(session)
    session.run("python", "tests/sdk_suites/run_official.py", *session.posargs)


@nox.session(python="3.11")
@nox.parametrize("store", ["sqlite", "postgres"])
def js(session: nox.Session, store: str) -> None:
    """The official JavaScript SDK (@microsoft/durabletask-js) against dt-trio, on an sqlite
    store in memory and on PostgreSQL."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        session.skip("node and npm are not on PATH: the JavaScript SDK tests need Node.js 18+")
    session.install("-e", ".[postgres]")
    session.run("npm", "ci", "--silent", "--prefix", "tests/js", external=True)
    python = os.path.join(session.bin, "python")
    test = ["npm", "test", "--prefix", "tests/js"]
    if store == "postgres":
        _need_postgres(session)
        # a throwaway cluster (or $DT_TRIO_TEST_PG) around the run
        test = ["python", "tests/_postgres.py", *test]
    session.run(*test, external=True, env={"DT_TRIO_PYTHON": python})


# What tests/go/run.py builds durabletask-go with besides `go`: Debian's Go libraries (GOPATH
# mode, as no Go module proxy is reached), each package with a directory it installs.
_GO_DEBIAN = {
    "golang-google-grpc-dev": "google.golang.org/grpc",
    "golang-google-protobuf-dev": "google.golang.org/protobuf",
    # grpc 1.33 marshals through github.com/golang/protobuf: its 1.3 cannot (APIv2 messages)
    "golang-github-golang-protobuf-1-5-dev": "github.com/golang/protobuf/internal/gengogrpc",
    "golang-github-google-uuid-dev": "github.com/google/uuid",
    "golang-github-cenkalti-backoff-dev": "github.com/cenkalti/backoff",
    "golang-opentelemetry-otel-dev": "go.opentelemetry.io/otel",
}
# Sources no registry here has: clones (git repositories or trees) named by these variables.
_GO_SOURCES = {
    "DT_TRIO_GO_SDK": "microsoft/durabletask-go",
    "DT_TRIO_GO_SEMAPHORE": "marusama/semaphore (v2.5.0)",
}


@nox.session(python="3.11")
@nox.parametrize("store", ["sqlite", "postgres"])
def go(session: nox.Session, store: str) -> None:
    """durabletask-go's own client and worker (`client`, `task`) against dt-trio (tests/go/), on
    an sqlite store in memory and on PostgreSQL: needs Debian's Go packages and the sources of
    durabletask-go ($DT_TRIO_GO_SDK) and marusama/semaphore ($DT_TRIO_GO_SEMAPHORE); skipped
    without them."""
    missing = [
        package
        for package, path in _GO_DEBIAN.items()
        if not os.path.exists(os.path.join("/usr/share/gocode/src", path))
    ]
    if shutil.which("go") is None:
        missing.insert(0, "golang-go")
    if missing:
        session.skip(f"Debian's Go packages are missing: apt-get install {' '.join(missing)}")
    sources = {name: os.environ.get(name, "") for name in _GO_SOURCES}
    for name, path in sources.items():
        if not os.path.isdir(path):
            session.skip(f"set {name} to a clone of {_GO_SOURCES[name]} (none at {path!r})")
    session.install("-e", ".[postgres]")
    test = ["python", "tests/go/run.py"]
    if store == "postgres":
        _need_postgres(session)
        test = ["python", "tests/_postgres.py", *test]  # a throwaway cluster (or $DT_TRIO_TEST_PG)
    session.run(
        *test, "--sdk", sources["DT_TRIO_GO_SDK"], "--semaphore", sources["DT_TRIO_GO_SEMAPHORE"]
    )


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """dt-trio against the SDK's in-memory reference server (and a no-op server, for the SDK
    worker's own limit), and what the dashboard costs: -- [--quick] [--rounds N] [--json FILE]
    [--only-dashboard]; a full run writes docs/bench-results/DATE-COMMIT.json and .md (the
    markdown table of the targets); -- --store postgres for 1, 2 and 3 sidecars on
    PostgreSQL."""
    session.install("-e", ".[test]")
    if "postgres" in session.posargs:
        _need_postgres(session)
    session.run("python", "tests/bench/bench.py", *session.posargs)


@nox.session(python="3.11")
def profile(session: nox.Session) -> None:
    """Where dt-trio's time goes, per layer (tests/bench/layers.py): CPU per orchestration and
    per activity by thread, and the py-spy sampler's share of each layer, for the sidecar's
    hello cities and fan-out and the local API's hello cities: -- [--quick] [--out FILE]
    [--samples DIR] [--store postgres]."""
    # py-spy: a sampling profiler that attaches to a running process and sees every thread;
    # nothing hand-written does that, and cProfile would see one thread and slow it down.
    session.install("-e", ".[test]", "py-spy")
    if "postgres" in session.posargs:
        _need_postgres(session)
    session.run("python", "tests/bench/layers.py", *session.posargs)
