"""The dashboard's JSON API and its guards, against a real sidecar run by the `dt-trio`
command, with the official SDK as the other client (no browser: tests/browser does that)."""

from __future__ import annotations

import functools
import http.client
import json
import pathlib
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC
from typing import Any

import grpc
import pytest
from _dashboard_scenario import (
    approval,
    checkout,
    fan_out,
    get_json,
    hello_cities,
    parent,
    post_json,
    scenario_worker,
)
from _harness import Sidecar, a_store, sdk_client, wait_until
from durabletask import client, entities
from durabletask.internal import orchestrator_service_pb2 as sdk_pb
from durabletask.internal import orchestrator_service_pb2_grpc as sdk_grpc
from google.protobuf import json_format

Status = client.OrchestrationStatus


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    tmp = tmp_path_factory.mktemp("dashboard")
    sidecar = Sidecar(a_store(tmp), tmp / "sidecar.log").start()
    try:
        with scenario_worker(sidecar.address):
            yield sidecar
    finally:
        assert sidecar.stop() == 0, sidecar.log_text()[-3000:]


@pytest.fixture(scope="module")
def c(hub: Sidecar) -> Iterator[client.TaskHubGrpcClient]:
    sdk = sdk_client(hub.address)
    yield sdk
    sdk.close()


def key() -> str:
    return uuid.uuid4().hex[:10]


def api(hub: Sidecar, path: str, **params: Any) -> Any:
    query = urllib.parse.urlencode(params, doseq=True)
    return get_json(f"{hub.ui_url}{path}" + (f"?{query}" if query else ""))


def quoted(instance_id: str) -> str:
    return urllib.parse.quote(instance_id, safe="")


def raw(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A request as a browser or a script would send it; (status, headers, body)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    conn.request(method, path, body=b"{}" if method == "POST" else None, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


# -- the command ---------------------------------------------------------------------------


@pytest.mark.store_independent
def test_the_command_logs_where_the_dashboard_is(tmp_path: pathlib.Path) -> None:
    sidecar = Sidecar("", tmp_path / "log.txt").start()
    try:
        assert sidecar.ui_url.startswith("http://127.0.0.1:")
        assert "dashboard at http://127.0.0.1:" in sidecar.log_text()
        assert get_json(f"{sidecar.ui_url}/api/instances")["instances"] == []
    finally:
        assert sidecar.stop() == 0
    quiet = Sidecar("", tmp_path / "quiet.txt", "--no-ui").start()
    try:
        assert quiet.ui_url == "" and "dashboard at" not in quiet.log_text()
    finally:
        assert quiet.stop() == 0


@pytest.mark.store_independent
def test_a_dashboard_reachable_from_other_machines_needs_tls_or_insecure() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dt_trio", "--ui", "0.0.0.0:0", "--db", ""],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "--ui 0.0.0.0:0 is reachable from other machines" in out.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "dt_trio", "--ui", "8233", "--db", ""],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--ui '8233' is not HOST:PORT" in bad.stderr


# -- reading -------------------------------------------------------------------------------


def test_the_list_is_newest_first_with_counts_and_filters(
    hub: Sidecar, c: client.TaskHubGrpcClient
) -> None:
    k = key()
    done = [
        c.schedule_new_orchestration(hello_cities, instance_id=f"{k}-hello-{n}") for n in range(3)
    ]
    failed = c.schedule_new_orchestration(checkout, input=7, instance_id=f"{k}-checkout")
    waiting = c.schedule_new_orchestration(approval, instance_id=f"{k}-approval")
    for instance_id in [*done, failed]:
        c.wait_for_orchestration_completion(instance_id, timeout=30)
    c.wait_for_orchestration_start(waiting, timeout=30)

    page = api(hub, "/api/instances", prefix=k)
    assert [i["instanceId"] for i in page["instances"]] == [waiting, failed, *reversed(done)]
    assert page["matching"] == 5
    assert page["counts"]["COMPLETED"] == 3 and page["counts"]["FAILED"] == 1
    assert page["counts"]["RUNNING"] == 1
    assert page["instances"][0]["status"] == "RUNNING"

    only_failed = api(hub, "/api/instances", prefix=k, status="failed")
    assert [i["instanceId"] for i in only_failed["instances"]] == [failed]
    assert only_failed["matching"] == 1 and only_failed["counts"]["COMPLETED"] == 3
    two = api(hub, "/api/instances", prefix=k, status=["failed", "running"])
    assert {i["instanceId"] for i in two["instances"]} == {failed, waiting}
    by_name = api(hub, "/api/instances", prefix=k, name="hello_cities")
    assert [i["instanceId"] for i in by_name["instances"]] == list(reversed(done))
    state = c.get_orchestration_state(failed)
    assert state is not None
    created = state.created_at.astimezone(UTC)
    before = api(
        hub,
        "/api/instances",
        prefix=k,
        created_before=(created).isoformat(),
    )
    assert [i["instanceId"] for i in before["instances"]] == list(reversed(done))
    after = api(hub, "/api/instances", prefix=k, created_after=created.isoformat())
    assert [i["instanceId"] for i in after["instances"]] == [waiting, failed]
    c.terminate_orchestration(waiting)


def test_pages_hold_fifty_and_follow_each_other_without_gaps(
    hub: Sidecar, c: client.TaskHubGrpcClient
) -> None:
    k = key()
    ids = [c.schedule_new_orchestration(approval, instance_id=f"{k}-{n:03}") for n in range(56)]
    first = api(hub, "/api/instances", prefix=k)
    assert len(first["instances"]) == 50 and first["newer"] is None
    second = get_json(hub.ui_url + first["older"])
    assert len(second["instances"]) == 6 and second["older"] is None
    shown = [i["instanceId"] for i in first["instances"] + second["instances"]]
    assert shown == list(reversed(ids))
    back = get_json(hub.ui_url + second["newer"])
    assert [i["instanceId"] for i in back["instances"]] == shown[:50]
    result = post_json(f"{hub.ui_url}/api/bulk", {"action": "terminate", "filter": {"prefix": k}})
    assert result == (
        200,
        {"action": "terminate", "matched": 56, "done": 56, "skipped": 0, "errors": []},
    )


def test_an_instance_shows_its_failure_children_and_timeline(
    hub: Sidecar, c: client.TaskHubGrpcClient
) -> None:
    k = key()
    failed = c.schedule_new_orchestration(checkout, input=13, instance_id=f"{k}-checkout")
    tree = c.schedule_new_orchestration(parent, instance_id=f"{k}-parent")
    c.wait_for_orchestration_completion(failed, timeout=30)
    c.wait_for_orchestration_completion(tree, timeout=30)

    shown = api(hub, f"/api/instances/{quoted(failed)}")
    assert shown["status"] == "FAILED" and shown["input"] == "13"
    assert "the card was declined for 13" in shown["failure"]["errorMessage"]
    bars = shown["timeline"]["bars"]
    assert [(b["kind"], b["name"], b["failed"]) for b in bars] == [
        ("activity", "say_hello", False),
        ("activity", "charge_card", True),
    ]
    assert all(b["end"] is not None for b in bars)

    family = api(hub, f"/api/instances/{quoted(tree)}")
    assert family["children"] == [f"{k}-parent-child"]
    child = api(hub, f"/api/instances/{quoted(tree + '-child')}")
    assert child["parentInstanceId"] == tree
    assert [b["kind"] for b in family["timeline"]["bars"]] == ["sub-orchestration"]


def test_the_history_is_what_stream_instance_history_returns(
    hub: Sidecar, c: client.TaskHubGrpcClient
) -> None:
    instance_id = c.schedule_new_orchestration(checkout, input=5, instance_id=f"{key()}-h")
    c.wait_for_orchestration_completion(instance_id, timeout=30)
    with grpc.insecure_channel(hub.address) as channel:
        chunks = sdk_grpc.TaskHubSidecarServiceStub(channel).StreamInstanceHistory(
            sdk_pb.StreamInstanceHistoryRequest(instanceId=instance_id), timeout=10
        )
        expected = [json_format.MessageToDict(e) for chunk in chunks for e in chunk.events]
    url = f"{hub.ui_url}/api/history/{quoted(instance_id)}"
    assert get_json(url) == expected
    status, headers, body = raw(url + "?download=1")
    assert status == 200 and json.loads(body) == expected
    assert headers["content-disposition"] == f'attachment; filename="{instance_id}-history.json"'


def test_a_long_history_is_streamed_in_chunks_with_every_event(
    hub: Sidecar, c: client.TaskHubGrpcClient
) -> None:
    instance_id = c.schedule_new_orchestration(fan_out, input=300, instance_id=f"{key()}-fan")
    state = c.wait_for_orchestration_completion(instance_id, timeout=60)
    assert state is not None and state.serialized_output == "300"
    history = get_json(f"{hub.ui_url}/api/history/{quoted(instance_id)}")
    assert len(history) > 600
    status, headers, body = raw(f"{hub.ui_url}/instances/{quoted(instance_id)}")
    assert status == 200 and headers.get("transfer-encoding") == "chunked"
    page = body.decode()
    assert page.count('<tr class="event') == len(history)
    assert page.count('class="bar bar-activity') == 300
    assert page.rstrip().endswith("</html>")
    pending = raw(f"{hub.ui_url}/instances/{quoted(instance_id)}?events=pending")[2].decode()
    assert pending.count('<tr class="event') == 0


@pytest.mark.store_independent
def test_the_dashboard_serves_tls_with_the_sidecars_certificate(tmp_path: pathlib.Path) -> None:
    cert, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            *("-keyout", str(key_file), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    sidecar = Sidecar(
        "", tmp_path / "log.txt", "--tls-cert", str(cert), "--tls-key", str(key_file)
    ).start()
    try:
        assert sidecar.ui_url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"{sidecar.ui_url}/api/instances", context=context) as r:
            assert json.loads(r.read())["instances"] == []
        with pytest.raises(OSError):  # plain HTTP is not served
            urllib.request.urlopen(sidecar.ui_url.replace("https", "http") + "/api/instances")
    finally:
        assert sidecar.stop() == 0


def test_entities_show_state_and_take_signals(hub: Sidecar, c: client.TaskHubGrpcClient) -> None:
    entity = entities.EntityInstanceId("counter", key())
    c.signal_entity(entity, "add", 5)
    entity_id = f"@counter@{entity.key}"
    url = f"{hub.ui_url}/api/entities/{quoted(entity_id)}"
    wait_until(lambda: _entity_state(url) == "5", what="the counter at 5")
    listed = api(hub, "/api/entities", prefix=f"counter@{entity.key}")
    assert [(e["entityId"], e["state"]) for e in listed["entities"]] == [(entity_id, "5")]
    assert post_json(url, {"action": "signal", "operation": "add", "input": "4"})[0] == 200
    wait_until(lambda: _entity_state(url) == "9", what="the counter at 9")
    metadata = c.get_entity(entity, include_state=True)
    assert metadata is not None and metadata.get_state(int) == 9


def _entity_state(url: str) -> str | None:
    try:
        return get_json(url)["state"]  # type: ignore[no-any-return]
    except urllib.error.HTTPError:
        return None


# -- acting --------------------------------------------------------------------------------


def test_actions_on_one_instance_reach_the_engine(
    hub: Sidecar, c: client.TaskHubGrpcClient
) -> None:
    k = key()
    waiting = c.schedule_new_orchestration(approval, instance_id=f"{k}-w")
    c.wait_for_orchestration_start(waiting, timeout=30)
    url = f"{hub.ui_url}/api/instances/{quoted(waiting)}"
    assert post_json(url, {"action": "suspend"})[0] == 200
    wait_until(lambda: _status(c, waiting) == Status.SUSPENDED, what="suspended")
    assert post_json(url, {"action": "resume"})[0] == 200
    wait_until(lambda: _status(c, waiting) == Status.RUNNING, what="running again")
    status, _ = post_json(url, {"action": "raise-event", "name": "approval", "data": '"yes"'})
    assert status == 200
    state = c.wait_for_orchestration_completion(waiting, timeout=30)
    assert state is not None and json.loads(state.serialized_output or "") == {"approved": "yes"}

    assert post_json(url, {"action": "restart"}) == (200, {"instanceId": waiting, "changed": True})
    c.wait_for_orchestration_start(waiting, timeout=30)
    assert post_json(url, {"action": "terminate"})[0] == 200
    state = c.wait_for_orchestration_completion(waiting, timeout=30)
    assert state is not None and state.runtime_status == Status.TERMINATED
    assert post_json(url, {"action": "purge"}) == (200, {"instanceId": waiting, "changed": True})
    assert c.get_orchestration_state(waiting) is None


def _status(c: client.TaskHubGrpcClient, instance_id: str) -> Status | None:
    state = c.get_orchestration_state(instance_id)
    return state.runtime_status if state is not None else None


def _suspended(c: client.TaskHubGrpcClient, instance_id: str) -> bool:
    return _status(c, instance_id) == Status.SUSPENDED


def test_bad_requests_get_a_status_and_a_message(hub: Sidecar) -> None:
    status, answer = post_json(f"{hub.ui_url}/api/instances/nobody", {"action": "terminate"})
    assert (status, answer) == (404, {"error": "no orchestration instance with id 'nobody'"})
    status, answer = post_json(f"{hub.ui_url}/api/instances/nobody", {"action": "dance"})
    assert status == 400 and answer["error"].startswith("action 'dance' is none of terminate")
    with pytest.raises(urllib.error.HTTPError) as info:
        api(hub, "/api/instances", status="sleeping")
    assert info.value.code == 400
    assert "status 'sleeping' is none of RUNNING" in json.loads(info.value.read())["error"]
    status, answer = post_json(f"{hub.ui_url}/api/bulk", {"action": "rewind", "ids": []})
    assert status == 400 and answer == {"error": "rewind is not a bulk action"}
    status, answer = post_json(
        f"{hub.ui_url}/api/instances/nobody", {"action": "raise-event", "name": "x", "data": "{"}
    )
    assert status == 400 and answer["error"].startswith("data is not JSON")


def test_a_bulk_action_on_a_selection_skips_what_it_does_not_apply_to(
    hub: Sidecar, c: client.TaskHubGrpcClient
) -> None:
    k = key()
    waiting = [c.schedule_new_orchestration(approval, instance_id=f"{k}-{n}") for n in range(3)]
    finished = c.schedule_new_orchestration(hello_cities, instance_id=f"{k}-done")
    c.wait_for_orchestration_completion(finished, timeout=30)
    status, answer = post_json(
        f"{hub.ui_url}/api/bulk",
        {"action": "suspend", "ids": [*waiting, finished, f"{k}-ghost"]},
    )
    assert status == 200
    assert (answer["matched"], answer["done"], answer["skipped"]) == (5, 3, 2)
    for instance_id in waiting:
        wait_until(functools.partial(_suspended, c, instance_id), what="suspended")
    status, answer = post_json(
        f"{hub.ui_url}/api/bulk",
        {"action": "purge", "filter": {"prefix": k, "status": "completed"}},
    )
    assert (answer["matched"], answer["done"]) == (1, 1)
    assert c.get_orchestration_state(finished) is None
    post_json(f"{hub.ui_url}/api/bulk", {"action": "terminate", "ids": waiting})


# -- live ----------------------------------------------------------------------------------


def test_an_instance_stream_sends_each_change_as_it_commits(
    hub: Sidecar, c: client.TaskHubGrpcClient
) -> None:
    waiting = c.schedule_new_orchestration(approval, instance_id=f"{key()}-live")
    c.wait_for_orchestration_start(waiting, timeout=30)
    history = get_json(f"{hub.ui_url}/api/history/{quoted(waiting)}")
    execution = api(hub, f"/api/instances/{quoted(waiting)}")["executionId"]
    parts = urllib.parse.urlsplit(hub.ui_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    conn.request(
        "GET",
        f"/api/live/instance/{quoted(waiting)}?execution={execution}&shown={len(history)}",
    )
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("content-type") == "text/event-stream; charset=utf-8"
    assert response.readline() == b": connected\n"
    first = _next_event(response)  # what the page shows now
    assert "RUNNING" in first["replace"]["summary"] and first["append"] == {}
    c.raise_orchestration_event(waiting, "approval", data="ok")
    update = _next_event(response)
    while "COMPLETED" not in update["replace"].get("summary", ""):
        update = _next_event(response)
    assert "EventRaised" in update["append"]["history-rows"]
    conn.close()


def _next_event(response: http.client.HTTPResponse) -> Any:
    lines: list[str] = []
    while True:
        line = response.readline().decode()
        if line == "\n" and lines:
            break
        if line.strip() and not line.startswith(":"):
            lines.append(line.strip())
    assert lines[0] == "event: update", lines
    return json.loads(lines[1].removeprefix("data: "))


# -- guards --------------------------------------------------------------------------------


def test_pages_carry_a_strict_policy_and_escape_payloads(
    hub: Sidecar, c: client.TaskHubGrpcClient
) -> None:
    nasty = f"{key()}<script>alert(1)</script>"
    c.schedule_new_orchestration(hello_cities, input="<script>alert(2)</script>", instance_id=nasty)
    c.wait_for_orchestration_completion(nasty, timeout=30)
    status, headers, body = raw(f"{hub.ui_url}/instances/{quoted(nasty)}")
    assert status == 200
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    page = body.decode()
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert page.count("<script") == 1  # dashboard.js, nothing inline
    assert '<script src="/static/dashboard.js" defer></script>' in page


def test_a_foreign_origin_or_host_is_refused(hub: Sidecar, c: client.TaskHubGrpcClient) -> None:
    waiting = c.schedule_new_orchestration(approval, instance_id=f"{key()}-csrf")
    c.wait_for_orchestration_start(waiting, timeout=30)
    url = f"{hub.ui_url}/api/instances/{quoted(waiting)}"
    status, answer = post_json(url, {"action": "terminate"}, {"Origin": "https://evil.example"})
    assert (
        status == 403
        and "cross-origin request from 'https://evil.example' refused" in answer["error"]
    )
    status, _ = post_json(url, {"action": "terminate"}, {"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    status, _, body = raw(f"{hub.ui_url}/api/instances", headers={"Host": "evil.example:80"})
    assert status == 421 and b"answers to localhost only" in body
    assert _status(c, waiting) == Status.RUNNING
    same = hub.ui_url  # the page's own origin is fine
    assert post_json(url, {"action": "terminate"}, {"Origin": same})[0] == 200


@pytest.mark.store_independent
def test_read_only_mode_hides_and_refuses_actions(tmp_path: pathlib.Path) -> None:
    sidecar = Sidecar("", tmp_path / "log.txt", "--ui-read-only").start()
    try:
        with scenario_worker(sidecar.address):
            c = sdk_client(sidecar.address)
            waiting = c.schedule_new_orchestration(approval, instance_id="ro")
            c.wait_for_orchestration_start(waiting, timeout=30)
            status, answer = post_json(
                f"{sidecar.ui_url}/api/instances/ro", {"action": "terminate"}
            )
            assert (status, answer) == (
                403,
                {"error": "the dashboard is read-only (--ui-read-only)"},
            )
            for path in ("/instances", "/instances/ro"):
                page = raw(sidecar.ui_url + path)[2].decode()
                assert "data-bulk" not in page and "data-action" not in page
            assert _status(c, waiting) == Status.RUNNING
            c.close()
    finally:
        assert sidecar.stop() == 0


@pytest.mark.store_independent
def test_with_a_token_the_dashboard_asks_for_it_once(tmp_path: pathlib.Path) -> None:
    sidecar = Sidecar("", tmp_path / "log.txt", "--token", "s3cret").start()
    try:
        status, headers, _ = raw(f"{sidecar.ui_url}/instances?status=failed")
        assert status == 303 and headers["location"] == "/login?next=/instances%3Fstatus%3Dfailed"
        assert raw(f"{sidecar.ui_url}/api/instances")[0] == 401
        assert (
            raw(f"{sidecar.ui_url}/api/instances", headers={"Authorization": "Bearer s3cret"})[0]
            == 200
        )
        status, _, body = raw_form(sidecar.ui_url, "wrong")
        assert status == 401 and b"not the sidecar's token" in body
        status, headers, _ = raw_form(sidecar.ui_url, "s3cret")
        assert status == 303 and headers["location"] == "/instances"
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "s3cret" not in cookie
        session = cookie.split(";")[0]
        assert raw(f"{sidecar.ui_url}/instances", headers={"Cookie": session})[0] == 200
        assert raw(f"{sidecar.ui_url}/instances", headers={"Cookie": session + "x"})[0] == 303
    finally:
        assert sidecar.stop() == 0


def raw_form(base: str, token: str) -> tuple[int, dict[str, str], bytes]:
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    conn.request(
        "POST",
        "/login?next=/instances",
        body=urllib.parse.urlencode({"token": token}),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": base},
    )
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def test_the_dashboard_runs_beside_a_local_hub(tmp_path: pathlib.Path) -> None:
    """open_task_hub(ui=...) serves the same dashboard over a hub with no gRPC."""
    code = """
import trio, dt_trio, json, urllib.request, logging, re, io
registry = dt_trio.Registry()
@registry.orchestrator
def hello(ctx, _):
    return "hi"
stream = io.StringIO()
logging.basicConfig(level=logging.INFO, stream=stream)
async def main():
    async with dt_trio.open_task_hub("", registry=registry, ui="127.0.0.1:0") as client:
        instance_id = await client.schedule(hello)
        await client.wait_for_completion(instance_id)
        url = re.search(r"dashboard at (\\S+)", stream.getvalue()).group(1)
        def read():
            return json.loads(urllib.request.urlopen(url + "/api/instances").read())
        page = await trio.to_thread.run_sync(read)
        print(json.dumps([(i["name"], i["status"]) for i in page["instances"]]))
trio.run(main)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [["hello", "COMPLETED"]]
