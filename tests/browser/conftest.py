"""A real browser for the dashboard tests: Debian's Chromium driven by Playwright (`nox -s
browser` installs both). Every page records its console: an error there fails the test, and
a failing test leaves a screenshot in browser-failures/."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator
from typing import Any

import pytest

try:
    from playwright import sync_api as playwright_api
except ImportError:  # a plain `pytest` without the browser session's packages: nothing to run
    collect_ignore_glob = ["test_*.py"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # we run as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FAILURES = pathlib.Path("browser-failures")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--screenshots",
        metavar="DIR",
        help="save a screenshot of each dashboard page in DIR (the README's are in docs/)",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not pathlib.Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `nox -s browser` installs Debian's chromium")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Console:
    """What a page said on its console and threw; `allow` a pattern expected in one test."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.allowed: list[re.Pattern[str]] = []

    def allow(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.allowed)]


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
def page(browser: Any, console: Console, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(10_000)
    p.on("console", lambda m: console.errors.append(m.text) if m.type == "error" else None)
    p.on("pageerror", lambda e: console.errors.append(f"uncaught: {e}"))
    p.on("dialog", lambda d: console.errors.append(f"unexpected dialog: {d.message}"))
    yield p
    failed = getattr(request.node, "report_call", None)
    problems = console.unexpected()
    if (failed is not None and failed.failed) or problems:
        FAILURES.mkdir(exist_ok=True)
        shot = FAILURES / f"{request.node.name}.png"
        try:
            p.screenshot(path=str(shot), full_page=True)
        except Exception as exc:  # the page may be gone: the test's own failure says why
            print(f"no screenshot: {exc}")
        else:
            print(f"screenshot of the failing page: {shot}")
    context.close()
    assert not problems, f"console errors in the page: {problems}"
