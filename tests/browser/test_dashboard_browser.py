"""The dashboard in a real browser, against a sidecar running SDK orchestrations: what an
operator sees and clicks, checked against what the gRPC protocol says."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import pathlib
import subprocess
import sys
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from _dashboard_scenario import approval, checkout, hello_cities, parent, scenario_worker
from _harness import Sidecar, sdk_client, wait_until
from browser.conftest import Console
from durabletask import client, entities
from durabletask.internal import orchestrator_service_pb2 as sdk_pb
from durabletask.internal import orchestrator_service_pb2_grpc as sdk_grpc
from playwright.sync_api import Page, expect

Status = client.OrchestrationStatus


class Hub:
    def __init__(self, sidecar: Sidecar, c: client.TaskHubGrpcClient) -> None:
        self.sidecar = sidecar
        self.c = c
        self.url = sidecar.ui_url
        self.address = sidecar.address

    def status(self, instance_id: str) -> Status | None:
        state = self.c.get_orchestration_state(instance_id)
        return state.runtime_status if state is not None else None

    def suspended(self, instance_id: str) -> bool:
        return self.status(instance_id) == Status.SUSPENDED


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    tmp = tmp_path_factory.mktemp("browser")
    sidecar = Sidecar(str(tmp / "hub.sqlite3"), tmp / "sidecar.log").start()
    try:
        with scenario_worker(sidecar.address):
            c = sdk_client(sidecar.address)
            yield Hub(sidecar, c)
            c.close()
    finally:
        assert sidecar.stop() == 0, sidecar.log_text()[-3000:]


def key() -> str:
    return uuid.uuid4().hex[:8]


def quoted(instance_id: str) -> str:
    return urllib.parse.quote(instance_id, safe="")


def raise_event_as_an_operator(hub: Hub, instance_id: str, name: str, data: str) -> None:
    """As an operator raises it: `dt-trio instances raise-event`, in its own process."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dt_trio",
            "instances",
            "raise-event",
            "--address",
            hub.sidecar.address,
            instance_id,
            name,
            "--input",
            json.dumps(data),
        ],
        check=True,
        timeout=60,
    )


def rows(page: Page) -> list[str]:
    ids: list[str] = page.locator("#rows tr[data-id]").evaluate_all(
        "rs => rs.map(r => r.dataset.id)"
    )
    return ids


def open_live(page: Page, url: str) -> None:
    """Open a page and wait until its live stream is connected."""
    page.goto(url)
    expect(page.locator("body")).to_have_attribute("data-live-open", "1")


# -- the list --------------------------------------------------------------------------


def test_the_list_shows_every_instance_and_the_filters_narrow_it(hub: Hub, page: Page) -> None:
    k = key()
    hello = [
        hub.c.schedule_new_orchestration(hello_cities, instance_id=f"{k}-h{n}") for n in range(3)
    ]
    failed = hub.c.schedule_new_orchestration(checkout, input=9, instance_id=f"{k}-checkout")
    waiting = hub.c.schedule_new_orchestration(approval, instance_id=f"{k}-approval")
    for instance_id in [*hello, failed]:
        hub.c.wait_for_orchestration_completion(instance_id, timeout=30)
    hub.c.wait_for_orchestration_start(waiting, timeout=30)
    everything = [waiting, failed, *reversed(hello)]

    page.goto(f"{hub.url}/instances")
    shown = rows(page)
    assert shown[: len(everything)] == everything  # newest first; other tests' come before

    page.fill("input[name=prefix]", k)
    page.click("form.filters button[type=submit]")
    expect(page.locator("#rows tr[data-id]")).to_have_count(5)
    assert rows(page) == everything
    page.check("fieldset.statuses input[value=failed]")
    page.click("form.filters button[type=submit]")
    expect(page.locator("#rows tr[data-id]")).to_have_count(1)
    assert rows(page) == [failed]
    assert "status=failed" in page.url and f"prefix={k}" in page.url
    expect(page.locator("#matching")).to_have_text("1 matching")

    page.goto(f"{hub.url}/instances?prefix={k}&name=hello_cities")  # a deep link
    assert rows(page) == list(reversed(hello))
    expect(page.locator("input[name=name]")).to_have_value("hello_cities")
    page.click(".count-RUNNING")
    assert rows(page) == []
    hub.c.terminate_orchestration(waiting)


# -- an instance -----------------------------------------------------------------------


def test_the_history_is_the_streamed_history_and_the_timeline_has_a_bar_per_activity(
    hub: Hub, page: Page
) -> None:
    instance_id = hub.c.schedule_new_orchestration(hello_cities, instance_id=f"{key()}-hello")
    hub.c.wait_for_orchestration_completion(instance_id, timeout=30)
    with grpc.insecure_channel(hub.address) as channel:
        chunks = sdk_grpc.TaskHubSidecarServiceStub(channel).StreamInstanceHistory(
            sdk_pb.StreamInstanceHistoryRequest(instanceId=instance_id), timeout=10
        )
        events = [e for chunk in chunks for e in chunk.events]
    page.goto(f"{hub.url}/instances/{quoted(instance_id)}")
    table = page.locator("#history-rows tr")
    expect(table).to_have_count(len(events))
    kinds = table.locator("td.kind").all_inner_texts()
    expected = [e.WhichOneof("eventType") for e in events]
    assert [k[:1].lower() + k[1:] for k in kinds] == expected
    ids = table.locator("td:first-child").all_inner_texts()
    assert [int(i) for i in ids] == [e.eventId for e in events]
    scheduled = [e for e in events if e.HasField("taskScheduled")]
    assert len(scheduled) == 3
    expect(page.locator("svg.timeline rect.bar-activity")).to_have_count(3)
    assert page.locator("svg.timeline rect.bar-running").count() == 0
    expect(page.locator("#output")).to_contain_text('"Hello, Tokyo!"')


def test_the_failure_is_shown_and_the_history_filters_to_failed_events(
    hub: Hub, page: Page
) -> None:
    instance_id = hub.c.schedule_new_orchestration(checkout, input=31, instance_id=f"{key()}-c")
    hub.c.wait_for_orchestration_completion(instance_id, timeout=30)
    page.goto(f"{hub.url}/instances/{quoted(instance_id)}")
    expect(page.locator(".headline .status")).to_have_text("FAILED")
    expect(page.locator("#failure")).to_contain_text("the card was declined for 31")
    expect(page.locator("svg.timeline rect.bar-failed")).to_have_count(1)
    page.click(".event-filter a:text('failed')")
    kinds = page.locator("#history-rows td.kind").all_inner_texts()
    assert kinds == ["TaskFailed", "ExecutionCompleted"]
    expect(page.locator("button[data-action=rewind]")).to_be_visible()


def test_a_waiting_instance_turns_completed_on_screen_without_a_reload(
    hub: Hub, page: Page
) -> None:
    instance_id = hub.c.schedule_new_orchestration(approval, instance_id=f"{key()}-wait")
    hub.c.wait_for_orchestration_start(instance_id, timeout=30)
    open_live(page, f"{hub.url}/instances/{quoted(instance_id)}")
    expect(page.locator(".headline .status")).to_have_text("RUNNING")
    expect(page.locator("#history-rows td.kind:text('EventRaised')")).to_have_count(0)
    page.evaluate("window.sameDocument = true")  # gone if the page reloads
    raise_event_as_an_operator(hub, instance_id, "approval", "yes")
    expect(page.locator(".headline .status")).to_have_text("COMPLETED", timeout=2000)
    expect(page.locator("#history-rows td.kind:text('EventRaised')")).to_have_count(1)
    expect(page.locator("#output")).to_contain_text('"approved": "yes"')
    assert page.evaluate("window.sameDocument") is True


def confirm_with(page: Page, text: str) -> None:
    dialog = page.locator("dialog#confirm")
    expect(dialog).to_be_visible()
    expect(page.locator("#confirm-text")).to_have_text(text)
    page.click("#confirm-ok")


def test_terminate_suspend_resume_and_purge_clicked_in_the_page_reach_the_engine(
    hub: Hub, page: Page
) -> None:
    instance_id = hub.c.schedule_new_orchestration(approval, instance_id=f"{key()}-act")
    hub.c.wait_for_orchestration_start(instance_id, timeout=30)
    open_live(page, f"{hub.url}/instances/{quoted(instance_id)}")

    page.click("button[data-action=suspend]")
    wait_until(lambda: hub.status(instance_id) == Status.SUSPENDED, what="suspended")
    expect(page.locator(".headline .status")).to_have_text("SUSPENDED")
    page.click("button[data-action=resume]")
    wait_until(lambda: hub.status(instance_id) == Status.RUNNING, what="running again")
    expect(page.locator(".headline .status")).to_have_text("RUNNING")

    page.click("button[data-action=terminate]")
    confirm_with(page, "Terminate this instance?")
    state = hub.c.wait_for_orchestration_completion(instance_id, timeout=30)
    assert state is not None and state.runtime_status == Status.TERMINATED
    expect(page.locator(".headline .status")).to_have_text("TERMINATED")

    page.click("button[data-action=purge]")
    confirm_with(page, "Purge this instance and its history?")
    page.wait_for_url(f"{hub.url}/instances")
    assert hub.c.get_orchestration_state(instance_id) is None


def test_a_cancelled_confirmation_does_nothing(hub: Hub, page: Page) -> None:
    instance_id = hub.c.schedule_new_orchestration(approval, instance_id=f"{key()}-keep")
    hub.c.wait_for_orchestration_start(instance_id, timeout=30)
    page.goto(f"{hub.url}/instances/{quoted(instance_id)}")
    page.click("button[data-action=terminate]")
    expect(page.locator("dialog#confirm")).to_be_visible()
    page.click("#confirm-cancel")
    expect(page.locator("dialog#confirm")).to_be_hidden()
    page.click("button[data-action=suspend]")  # the next action goes through: the first did not
    wait_until(lambda: hub.status(instance_id) == Status.SUSPENDED, what="suspended")
    hub.c.terminate_orchestration(instance_id)


def test_bulk_terminate_of_200_instances_by_filter(hub: Hub, page: Page) -> None:
    k = key()
    ids = [
        hub.c.schedule_new_orchestration(approval, instance_id=f"{k}-{n:03}") for n in range(200)
    ]
    unrelated = hub.c.schedule_new_orchestration(approval, instance_id=f"other-{k}")
    wait_until(
        lambda: all(hub.status(i) == Status.RUNNING for i in (ids[-1], unrelated)),
        what="all started",
    )
    page.goto(f"{hub.url}/instances?prefix={k}")
    expect(page.locator("#matching")).to_have_text("200 matching")
    expect(page.locator("#rows tr[data-id]")).to_have_count(50)
    page.check("#all-matching")
    page.click("button[data-bulk=terminate]")
    confirm_with(page, "Terminate 200 instances matching the filter?")
    expect(page.locator("#flash")).to_have_text(
        "terminate: 200 of 200 done, 0 skipped", timeout=30_000
    )
    for instance_id in ids:
        state = hub.c.wait_for_orchestration_completion(instance_id, timeout=30)
        assert state is not None and state.runtime_status == Status.TERMINATED
    assert hub.status(unrelated) == Status.RUNNING
    expect(page.locator(".count-TERMINATED b")).to_have_text("200")  # the list refreshed live
    hub.c.terminate_orchestration(unrelated)


def test_selected_rows_are_acted_on_and_kept_selected_across_refreshes(
    hub: Hub, page: Page
) -> None:
    k = key()
    ids = [hub.c.schedule_new_orchestration(approval, instance_id=f"{k}-{n}") for n in range(4)]
    for instance_id in ids:
        hub.c.wait_for_orchestration_start(instance_id, timeout=30)
    open_live(page, f"{hub.url}/instances?prefix={k}")
    page.check(f"input.pick[value='{ids[0]}']")
    page.check(f"input.pick[value='{ids[1]}']")
    expect(page.locator("#picked")).to_have_text("2 selected")
    hub.c.terminate_orchestration(ids[3])  # a change: the list redraws
    expect(page.locator(f"tr[data-id='{ids[3]}'] .status")).to_have_text("TERMINATED")
    expect(page.locator("#picked")).to_have_text("2 selected")
    page.click("button[data-bulk=suspend]")
    confirm_with(page, "Suspend 2 selected instances?")
    expect(page.locator("#flash")).to_have_text("suspend: 2 of 2 done, 0 skipped")
    for instance_id in ids[:2]:
        wait_until(functools.partial(hub.suspended, instance_id), what="suspended")
    assert hub.status(ids[2]) == Status.RUNNING
    for instance_id in ids[:3]:
        hub.c.terminate_orchestration(instance_id)


# -- entities --------------------------------------------------------------------------


def test_entity_state_shows_after_signals(hub: Hub, page: Page) -> None:
    entity = entities.EntityInstanceId("counter", key())
    entity_id = f"@counter@{entity.key}"
    hub.c.signal_entity(entity, "add", 5)
    hub.c.signal_entity(entity, "add", 2)
    wait_until(
        lambda: (
            (m := hub.c.get_entity(entity, include_state=True)) is not None
            and m.get_state(int) == 7
        ),
        what="the counter at 7",
    )
    page.goto(f"{hub.url}/entities?prefix=counter@{entity.key}")
    expect(page.locator("#entity-rows tr[data-id] td.state")).to_have_text("7")
    page.click(f"#entity-rows a:text('{entity_id}')")
    expect(page.locator("#state")).to_have_text("7")
    expect(page.locator("body")).to_have_attribute("data-live-open", "1")
    page.fill("form.signal input[name=operation]", "add")
    page.fill("form.signal input[name=input]", "3")
    page.click("form.signal button")
    expect(page.locator("#state")).to_have_text("10")  # live: no reload
    metadata = hub.c.get_entity(entity, include_state=True)
    assert metadata is not None and metadata.get_state(int) == 10


# -- safety ----------------------------------------------------------------------------


def test_a_script_payload_renders_as_text(hub: Hub, page: Page) -> None:
    nasty = f"{key()}<script>alert(1)</script>"
    hub.c.schedule_new_orchestration(
        hello_cities, input="<img src=x onerror=alert(2)>", instance_id=nasty
    )
    hub.c.wait_for_orchestration_completion(nasty, timeout=30)
    page.goto(f"{hub.url}/instances?prefix={quoted(nasty[:8])}")
    expect(page.locator("#rows td.id a")).to_have_text(nasty)
    page.click("#rows td.id a")
    expect(page.locator("h1 code")).to_have_text(nasty)
    expect(page.locator("#input")).to_have_text('"<img src=x onerror=alert(2)>"')
    assert page.locator("main script, main img").count() == 0  # nothing became markup


def test_a_post_from_a_foreign_origin_is_refused(
    hub: Hub, page: Page, console: Console, tmp_path: pathlib.Path
) -> None:
    instance_id = hub.c.schedule_new_orchestration(approval, instance_id=f"{key()}-csrf")
    hub.c.wait_for_orchestration_start(instance_id, timeout=30)
    target = f"{hub.url}/api/instances/{quoted(instance_id)}"
    (tmp_path / "evil.html").write_text(
        f'<form method="post" action="{target}" enctype="text/plain">'
        '<input name=\'{"action": "terminate", "x": "\' value=\'"}\'>'
        "<button>win a prize</button></form>"
    )
    console.allow("status of 403")  # the dashboard's refusal
    console.allow("status of 404")  # the other site has no favicon
    with _static_site(tmp_path) as site:
        page.goto(f"{site}/evil.html")
        page.click("button")
        expect(page.locator("body")).to_contain_text(f"cross-origin request from '{site}' refused")
    assert hub.status(instance_id) == Status.RUNNING
    hub.c.terminate_orchestration(instance_id)


@pytest.fixture
def token_hub(tmp_path: pathlib.Path) -> Iterator[Sidecar]:
    sidecar = Sidecar("", tmp_path / "log.txt", "--token", "open-sesame").start()
    try:
        yield sidecar
    finally:
        assert sidecar.stop() == 0


def test_without_the_token_the_page_refuses(
    token_hub: Sidecar, page: Page, console: Console
) -> None:
    console.allow("status of 401")
    page.goto(f"{token_hub.ui_url}/instances?status=failed")
    expect(page.locator("h1")).to_have_text("Log in")
    assert page.locator("table.instances").count() == 0
    page.fill("input[name=token]", "wrong")
    page.click("form.login button")
    expect(page.locator(".error-message")).to_have_text("That is not the sidecar's token.")
    page.fill("input[name=token]", "open-sesame")
    page.click("form.login button")
    expect(page.locator("h1")).to_have_text("Instances")
    assert page.url.endswith("/instances?status=failed")  # back where it was going
    [cookie] = page.context.cookies()
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert "open-sesame" not in cookie["value"]
    page.goto(f"{token_hub.ui_url}/entities")  # asked once: the cookie carries on
    expect(page.locator("h1")).to_have_text("Entities")


def test_read_only_mode_has_no_actions(
    tmp_path: pathlib.Path, page: Page, console: Console
) -> None:
    sidecar = Sidecar("", tmp_path / "log.txt", "--ui-read-only").start()
    try:
        with scenario_worker(sidecar.address):
            c = sdk_client(sidecar.address)
            waiting = c.schedule_new_orchestration(approval, instance_id="read-only")
            c.wait_for_orchestration_start(waiting, timeout=30)
            page.goto(f"{sidecar.ui_url}/instances")
            expect(page.locator(".readonly")).to_have_text("read-only")
            expect(page.locator("#rows tr[data-id]")).to_have_count(1)
            assert page.locator("[data-bulk], input.pick, #all-matching").count() == 0
            page.goto(f"{sidecar.ui_url}/instances/read-only")
            expect(page.locator(".headline .status")).to_have_text("RUNNING")
            assert page.locator("button[data-action], form.raise").count() == 0
            console.allow("status of 403")
            status = page.evaluate(
                """fetch('/api/instances/read-only', {method: 'POST',
                     headers: {'content-type': 'application/json'},
                     body: JSON.stringify({action: 'terminate'})}).then(r => r.status)"""
            )
            assert status == 403
            assert c.get_orchestration_state(waiting).runtime_status == Status.RUNNING
            c.close()
    finally:
        assert sidecar.stop() == 0


# -- screenshots for the README (nox -s browser -- --screenshots docs) -------------------------


def test_screenshots_of_each_page(hub: Hub, page: Page, request: pytest.FixtureRequest) -> None:
    folder = request.config.getoption("--screenshots")
    if not folder:
        pytest.skip("give --screenshots DIR to save the README's screenshots")
    out = pathlib.Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    k = "shop"
    for n in range(3):
        hub.c.schedule_new_orchestration(hello_cities, instance_id=f"{k}-hello-{n}")
    hub.c.schedule_new_orchestration(checkout, input=120, instance_id=f"{k}-checkout-7")
    hub.c.schedule_new_orchestration(parent, instance_id=f"{k}-order-42")
    waiting = hub.c.schedule_new_orchestration(approval, instance_id=f"{k}-approval-3")
    for instance_id in (f"{k}-hello-2", f"{k}-checkout-7", f"{k}-order-42"):
        hub.c.wait_for_orchestration_completion(instance_id, timeout=30)
    hub.c.wait_for_orchestration_start(waiting, timeout=30)
    hub.c.signal_entity(entities.EntityInstanceId("counter", "visitors"), "add", 42)
    page.set_viewport_size({"width": 1280, "height": 760})
    for name, path, whole in (
        ("instances", f"/instances?prefix={k}", False),
        ("instance", f"/instances/{k}-hello-2", True),
        ("instance-failed", f"/instances/{k}-checkout-7", True),
        ("entities", "/entities", False),
        ("entity", "/entities/@counter@visitors", False),
    ):
        page.goto(hub.url + path)
        page.screenshot(path=str(out / f"dashboard-{name}.png"), full_page=whole)
    hub.c.terminate_orchestration(waiting)


@contextlib.contextmanager
def _static_site(folder: pathlib.Path) -> Iterator[str]:
    """Another site (another origin) on loopback, serving the files in `folder`."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
