"""The dashboard's test scenario: SDK orchestrations of every kind the pages show (hello
cities, a failing one, one waiting for an event, an entity counter), run on a real sidecar
by the official SDK's worker. Shared by the JSON API tests, the browser tests and the
screenshot script."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from _harness import sdk_worker
from durabletask import entities, task, worker


def say_hello(ctx: task.ActivityContext, city: str) -> str:
    return f"Hello, {city}!"


def hello_cities(ctx: task.OrchestrationContext, _: Any) -> Any:
    greetings = []
    for city in ("Tokyo", "Seattle", "London"):
        greetings.append((yield ctx.call_activity(say_hello, input=city)))
    return greetings


def charge_card(ctx: task.ActivityContext, amount: int) -> None:
    raise ValueError(f"the card was declined for {amount}")


def checkout(ctx: task.OrchestrationContext, amount: int) -> Any:
    yield ctx.call_activity(say_hello, input="checkout")
    return (yield ctx.call_activity(charge_card, input=amount))


def approval(ctx: task.OrchestrationContext, _: Any) -> Any:
    ctx.set_custom_status("waiting for approval")
    answer = yield ctx.wait_for_external_event("approval")
    return {"approved": answer}


def nap(ctx: task.OrchestrationContext, seconds: int) -> Any:
    yield ctx.create_timer(ctx.current_utc_datetime + timedelta(seconds=seconds))
    return "rested"


def parent(ctx: task.OrchestrationContext, _: Any) -> Any:
    child = yield ctx.call_sub_orchestrator(hello_cities, instance_id=f"{ctx.instance_id}-child")
    return {"child": child}


def fan_out(ctx: task.OrchestrationContext, n: int) -> Any:
    return len(
        (yield task.when_all([ctx.call_activity(say_hello, input=str(i)) for i in range(n)]))
    )


def counter(ctx: entities.EntityContext, value: Any) -> Any:
    current = ctx.get_state(int, 0)
    if ctx.operation == "add":
        ctx.set_state(current + int(value))
    elif ctx.operation == "get":
        return current
    return None


ORCHESTRATORS: list[Callable[..., Any]] = [hello_cities, checkout, approval, nap, parent, fan_out]
ACTIVITIES: list[Callable[..., Any]] = [say_hello, charge_card]


@contextlib.contextmanager
def scenario_worker(address: str) -> Iterator[worker.TaskHubGrpcWorker]:
    with sdk_worker(address, ORCHESTRATORS, ACTIVITIES, [counter]) as w:
        yield w


def get_json(url: str, token: str | None = None) -> Any:
    """GET a JSON API url; HTTPError for an error status."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.loads(response.read())


def post_json(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST JSON; (status, decoded answer) whatever the status."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
