"""Which store the suite runs on, and a real PostgreSQL when it is that one.

`DT_TRIO_TEST_STORE=postgres` runs the suite on PostgreSQL (`nox -s "tests(store='postgres')"`):
a throwaway cluster for the session, or the server `DT_TRIO_TEST_PG` names; every test gets a
task hub of its own. Tests of one store only are marked `sqlite_only` or `postgres_only` and
skipped on the other; tests whose result does not depend on the suite's store (they touch no
store, or make an sqlite store of their own) are marked `store_independent` and run once, in
the sqlite run: a PostgreSQL run deselects them.

The fixtures every module may use are here (`sidecar`, `store`, `pg_address`); the helpers
they are built on are in _harness.py, and nothing here imports the official SDK or a
PostgreSQL driver, so the pure tests need neither.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import _postgres
import pytest
from _harness import STORE, STORE_KINDS, Sidecar, running_sidecar, store_factory


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only: a test of the sqlite store itself")
    config.addinivalue_line("markers", "postgres_only: a test of the PostgreSQL store itself")
    config.addinivalue_line(
        "markers",
        "store_independent: the same whichever store the suite runs on (it touches none, or "
        "makes an sqlite store of its own): run in the sqlite run only",
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"store: {STORE}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    other = "sqlite_only" if STORE == "postgres" else "postgres_only"
    skip = pytest.mark.skip(reason=f"a test of the other store (this run is on {STORE})")
    for item in items:
        if other in item.keywords:
            item.add_marker(skip)
    if STORE == "postgres":
        # Run once, by the sqlite run: here they would only repeat it.
        once = [item for item in items if "store_independent" in item.keywords]
        if once:
            config.hook.pytest_deselected(items=once)
            items[:] = [item for item in items if "store_independent" not in item.keywords]


@pytest.fixture(scope="session")
def pg_address() -> Iterator[str]:
    """A PostgreSQL server for the whole session (made on first use); on a server that
    outlives the session ($DT_TRIO_TEST_PG), the tests' hubs are dropped at its end."""
    given = os.environ.get(_postgres.ENV_SERVER)
    with _postgres.server() as address:
        yield address
        if given:
            _postgres.drop_hubs(address)


@pytest.fixture(scope="session", autouse=STORE == "postgres")
def _postgres_for_the_harness(pg_address: str) -> Iterator[None]:
    """On a PostgreSQL run, the harness finds the server where it finds a given one."""
    before = os.environ.get(_postgres.ENV_SERVER)
    os.environ[_postgres.ENV_SERVER] = pg_address
    yield
    if before is None:
        del os.environ[_postgres.ENV_SERVER]


@pytest.fixture
def sidecar(tmp_path: pathlib.Path) -> Iterator[Sidecar]:
    """A sidecar on a store of its own, stopped with SIGTERM (exit code 0) afterwards."""
    with running_sidecar(tmp_path) as s:
        yield s


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Any]:
    """An opened store of each kind the suite's store comes in (see STORE_KINDS), closed
    afterwards."""
    backend = store_factory(request.param, tmp_path)()
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()
