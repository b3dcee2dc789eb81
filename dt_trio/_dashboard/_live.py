"""Live pages: server-sent event streams woken by the engine's commit signals (no polling).

A page names the regions it shows (element ids); a stream sends the regions whose HTML
changed (`replace`), rows to add (`append`), `reload` when the page no longer fits (the
instance started a new execution, say), or `gone` when what it shows was deleted. List
refreshes come at most once per interval.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dt_trio._engine._signals import Changes, Signals

# An idle stream sends a comment this often, so dead connections are found and closed.
PING_SECONDS = 20.0
# Lists (instances, entities) refresh at most this often, however busy the hub.
LIST_INTERVAL = 1.0
# An instance's page, at most this often: each step shows, a busy instance costs little.
INSTANCE_INTERVAL = 0.2


@dataclass
class Update:
    replace: dict[str, str] = field(default_factory=dict)
    append: dict[str, str] = field(default_factory=dict)
    reload: bool = False
    gone: bool = False  # what the page shows no longer exists (a purged instance)

    def __bool__(self) -> bool:
        return bool(self.replace or self.append or self.reload or self.gone)


Emit = Callable[[Update], Awaitable[None]]


Ping = Callable[[], Awaitable[None]]


class EventStream(Response):
    """A text/event-stream that `produce(emit, ping)` writes until it returns or the client
    goes away (then `produce` is cancelled)."""

    def __init__(self, produce: Callable[[Emit, Ping], Awaitable[None]]) -> None:
        super().__init__(media_type="text/event-stream")
        self._produce = produce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-store"),
                ],
            }
        )

        async def write(text: str) -> None:
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})

        async def emit(update: Update) -> None:
            if update.gone:
                await write("event: gone\ndata: {}\n\n")
            elif update.reload:
                await write("event: reload\ndata: {}\n\n")
            else:
                data = json.dumps({"replace": update.replace, "append": update.append})
                await write(f"event: update\ndata: {data}\n\n")

        async def ping() -> None:
            await write(": ping\n\n")

        async with trio.open_nursery() as nursery:

            async def until_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_disconnect)
            await write(": connected\n\n")
            await self._produce(emit, ping)
            nursery.cancel_scope.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_pinging(
    wait: Callable[[], Awaitable[None]], ping: Callable[[], Awaitable[None]]
) -> None:
    while True:
        with trio.move_on_after(PING_SECONDS):
            await wait()
            return
        await ping()


async def follow_hub(
    changes: Changes,
    render: Callable[[], Awaitable[dict[str, str]]],
    emit: Emit,
    ping: Ping,
    interval: float = LIST_INTERVAL,
) -> None:
    """Send the regions `render` draws whenever they change, after any change of the hub,
    at most once per `interval`. Runs until cancelled."""
    shown: dict[str, str] = {}
    while True:
        seen = changes.count
        rendered_at = trio.current_time()
        regions = await render()
        changed = {k: v for k, v in regions.items() if shown.get(k) != v}
        if changed:
            await emit(Update(replace=changed))
            shown = regions
        await _wait_pinging(functools.partial(changes.wait_past, seen), ping)
        await trio.sleep_until(rendered_at + interval)


async def follow_instance(
    signals: Signals,
    instance_id: str,
    render: Callable[[], Awaitable[Update]],
    emit: Emit,
    ping: Ping,
    interval: float = INSTANCE_INTERVAL,
) -> None:
    """Send what `render` draws of the instance now and after every commit that changes it
    (at most once per `interval`); stop after an update that reloads the page or says the
    instance is gone."""
    while True:
        change = signals.instance_event(instance_id)  # before the read: no change is missed
        try:
            rendered_at = trio.current_time()
            update = await render()
            if update:
                await emit(update)
            if update.reload or update.gone:
                return
            await _wait_pinging(change.wait, ping)
        finally:
            signals.release(instance_id, change)
        await trio.sleep_until(rendered_at + interval)
