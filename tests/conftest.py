"""Which store the suite runs on, and a real PostgreSQL when it is that one.

`DT_TRIO_TEST_STORE=postgres` runs the suite on PostgreSQL (`nox -s "tests(store='postgres')"`):
a throwaway cluster for the session, or the server `DT_TRIO_TEST_PG` names; every test gets a
task hub of its own. Tests of one store only are marked `sqlite_only` or `postgres_only` and
skipped on the other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import _postgres
import pytest

STORE = os.environ.get("DT_TRIO_TEST_STORE", "sqlite")
if STORE not in ("sqlite", "postgres"):
    raise RuntimeError(f"DT_TRIO_TEST_STORE must be sqlite or postgres, not {STORE!r}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only: a test of the sqlite store itself")
    config.addinivalue_line("markers", "postgres_only: a test of the PostgreSQL store itself")


def pytest_report_header(config: pytest.Config) -> str:
    return f"store: {STORE}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    other = "sqlite_only" if STORE == "postgres" else "postgres_only"
    skip = pytest.mark.skip(reason=f"a test of the other store (this run is on {STORE})")
    for item in items:
        if other in item.keywords:
            item.add_marker(skip)


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
