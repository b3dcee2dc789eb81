"""The dashboard's pages and JSON API (Starlette), over the store and HubClient the gRPC
service uses.

Pages                                  JSON API (the same data, for scripts)
  /instances?status=&name=&prefix=...    GET /api/instances?...   POST /api/bulk
  /instances/{id}?events=failed|pending  GET /api/instances/{id}  POST /api/instances/{id}
                                         GET /api/history/{id}[?download=1]
  /entities?prefix=                      GET /api/entities?...
  /entities/{id}                         GET /api/entities/{id}   POST /api/entities/{id}
Live updates: GET /api/live/instances?..., /api/live/instance/{id}, /api/live/entities?...,
/api/live/entity/{id} (server-sent events).
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

import jinja2
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.types import ASGIApp

from dt_trio._core import EntityState, InstanceState, Status, check_entity_id, entity_id_prefix
from dt_trio._dashboard import _history as hist
from dt_trio._dashboard._actions import APPLIES, Action, act, bulk
from dt_trio._dashboard._live import EventStream, Update, follow_hub, follow_instance
from dt_trio._dashboard._security import Guard, GuardMiddleware
from dt_trio._dashboard._views import (
    PAGE_SIZE,
    EntityQuery,
    InstancePage,
    InstanceQuery,
    children_of,
    counts_json,
    entity_json,
    event_json,
    instance_json,
    iso,
    pretty,
    query_from_json,
    shown_time,
    time_param,
)
from dt_trio._engine import HubClient
from dt_trio._errors import (
    DtTrioError,
    FailedPrecondition,
    InstanceExists,
    InstanceNotFound,
    InvalidRequest,
    StoreUnavailable,
)
from dt_trio._log import get_logger
from dt_trio._proto import orchestrator_service_pb2 as pb
from dt_trio._store import EntityFilter

if TYPE_CHECKING:
    from dt_trio._metrics._http import Probes

log = get_logger(__name__)

_HERE = pathlib.Path(__file__).parent
_STATIC_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# A streamed page is sent in pieces of about this size, with a checkpoint between them so
# that rendering a long history never holds up the engine.
STREAM_CHUNK_BYTES = 64 * 1024
CHILDREN_SHOWN = 100
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
HISTORY_JSON_CHUNK = 256


def _status_of(error: DtTrioError) -> int:
    for kind, status in (
        (InvalidRequest, 400),
        (InstanceNotFound, 404),
        (InstanceExists, 409),
        (FailedPrecondition, 409),
        (StoreUnavailable, 503),
    ):
        if isinstance(error, kind):
            return status
    return 500


def _params(request: Request) -> dict[str, list[str]]:
    return {key: request.query_params.getlist(key) for key in request.query_params}


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise InvalidRequest("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


class Dashboard:
    """The routes, bound to one hub."""

    def __init__(self, client: HubClient, guard: Guard) -> None:
        self.client = client
        self.store = client.store
        self.guard = guard
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.globals.update(
            read_only=guard.read_only,
            statuses=list(Status),
            shown_time=shown_time,
            time_param=time_param,
            frozenset=frozenset,
            pretty=pretty,
            applies=lambda action, state: APPLIES[Action(action)](state),
        )
        self.templates.filters["url"] = lambda value: quote(str(value), safe="")
        self._macros = self.templates.get_template("_macros.html").module
        self.static = {
            f.name: (f.read_bytes(), _STATIC_TYPES[f.suffix])
            for f in (_HERE / "static").iterdir()
            if f.suffix in _STATIC_TYPES
        }

    def routes(self) -> list[Route]:
        return [
            Route("/", lambda _: RedirectResponse("/instances", 303)),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/static/{name}", self.static_file),
            Route("/favicon.ico", lambda _: Response(status_code=204)),
            Route("/instances", self.instances_page),
            Route("/instances/{instance_id:path}", self.instance_page),
            Route("/entities", self.entities_page),
            Route("/entities/{entity_id:path}", self.entity_page),
            Route("/api/instances", self.instances_api),
            Route("/api/instances/{instance_id:path}", self.instance_api, methods=["GET", "POST"]),
            Route("/api/history/{instance_id:path}", self.history_api),
            Route("/api/bulk", self.bulk_api, methods=["POST"]),
            Route("/api/entities", self.entities_api),
            Route("/api/entities/{entity_id:path}", self.entity_api, methods=["GET", "POST"]),
            Route("/api/live/instances", self.instances_live),
            Route("/api/live/instance/{instance_id:path}", self.instance_live),
            Route("/api/live/entities", self.entities_live),
            Route("/api/live/entity/{entity_id:path}", self.entity_live),
        ]

    # -- errors and rendering -----------------------------------------------------------

    async def on_error(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, DtTrioError):
            status, message = _status_of(exc), str(exc)
        elif isinstance(exc, HTTPException):
            status, message = exc.status_code, str(exc.detail)
        else:
            raise exc
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status)
        return self.page("error.html", status=status, title="Error", message=message)

    def fragment(self, macro: str, *args: object) -> str:
        """One region of a page, drawn by its macro in _macros.html."""
        return str(getattr(self._macros, macro)(*args))

    def page(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.templates.get_template(name).render(**context)
        return HTMLResponse(html, status, headers={"cache-control": "no-store"})

    def streamed(self, name: str, **context: Any) -> StreamingResponse:
        """A page sent as it renders, in pieces of STREAM_CHUNK_BYTES."""
        pieces = self.templates.get_template(name).generate(**context)

        async def chunks() -> AsyncIterator[bytes]:
            buffered: list[str] = []
            size = 0
            for piece in pieces:
                buffered.append(piece)
                size += len(piece)
                if size >= STREAM_CHUNK_BYTES:
                    yield "".join(buffered).encode()
                    buffered, size = [], 0
                    await trio.lowlevel.checkpoint()
            yield "".join(buffered).encode()

        return StreamingResponse(
            chunks(), media_type="text/html; charset=utf-8", headers={"cache-control": "no-store"}
        )

    async def static_file(self, request: Request) -> Response:
        found = self.static.get(request.path_params["name"])
        if found is None:
            raise HTTPException(404, "no such file")
        return Response(found[0], media_type=found[1], headers={"cache-control": "max-age=300"})

    # -- login ------------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        target = request.query_params.get("next") or "/instances"
        if not target.startswith("/") or target.startswith("//"):
            target = "/instances"  # only ever back into this dashboard
        if self.guard.token is None:
            return RedirectResponse(target, 303)
        if request.method == "GET":
            return self.page("login.html", title="Log in", next=target, refused=False)
        # A urlencoded form of one field (Starlette's form parser needs another package).
        given = parse_qs((await request.body()).decode("utf-8", "replace")).get("token", [""])[-1]
        if self.guard.authenticated({"authorization": f"Bearer {given}"}):
            response = RedirectResponse(target, 303)
            response.headers["set-cookie"] = self.guard.cookie_header()
            return response
        return self.page("login.html", status=401, title="Log in", next=target, refused=True)

    # -- instances ------------------------------------------------------------------------

    async def instance_list(self, query: InstanceQuery) -> InstancePage:
        where = query.where()
        if query.before is not None:  # the previous page: walk forward, show newest first
            rows, further = await self.store.query_instances(where, PAGE_SIZE, query.before)
            rows.reverse()
            newer = _key(rows[0]) if further is not None and rows else None
            older = _key(rows[-1]) if rows else None
        else:
            rows, older = await self.store.query_instances(
                where, PAGE_SIZE, query.after, newest_first=True
            )
            newer = _key(rows[0]) if query.after is not None and rows else None
        counts = await self.store.count_instances(query.where(with_statuses=False))
        return InstancePage(query, rows, counts, newer, older)

    def list_regions(self, page: InstancePage) -> dict[str, str]:
        return {
            "counts": self.fragment("counts", page),
            "rows": self.fragment("instance_rows", page.instances),
            "pager": self.fragment("pager", page),
        }

    async def instances_page(self, request: Request) -> Response:
        query = InstanceQuery.parse(_params(request))
        page = await self.instance_list(query)
        live = query.url("/api/live/instances")
        return self.page("instances.html", title="Instances", page=page, query=query, live=live)

    async def instances_api(self, request: Request) -> Response:
        query = InstanceQuery.parse(_params(request))
        page = await self.instance_list(query)
        return JSONResponse(
            {
                "counts": counts_json(page.counts),
                "matching": page.matching,
                "instances": [instance_json(s, payloads=False) for s in page.instances],
                "newer": query.url("/api/instances", after=None, before=page.newer)
                if page.newer
                else None,
                "older": query.url("/api/instances", after=page.older, before=None)
                if page.older
                else None,
            }
        )

    async def instances_live(self, request: Request) -> Response:
        query = InstanceQuery.parse(_params(request))

        async def render() -> dict[str, str]:
            return self.list_regions(await self.instance_list(query))

        return EventStream(
            lambda emit, ping: follow_hub(self.client.signals.changes, render, emit, ping)
        )

    async def _instance(self, instance_id: str) -> tuple[InstanceState, list[pb.HistoryEvent]]:
        state = await self.store.get_instance(instance_id)
        if state is None:
            raise InstanceNotFound(instance_id)
        history = await self.store.get_history(instance_id)
        return state, history

    def _details(self, state: InstanceState, history: list[pb.HistoryEvent]) -> dict[str, Any]:
        children = children_of(history)
        return {
            "state": state,
            "children": children[:CHILDREN_SHOWN],
            "more_children": max(0, len(children) - CHILDREN_SHOWN),
            "geometry": hist.layout(hist.timeline(history), datetime.now(UTC)),
        }

    def instance_regions(self, details: dict[str, Any]) -> dict[str, str]:
        return {
            "summary": str(
                self.fragment(
                    "summary", details["state"], details["children"], details["more_children"]
                )
            ),
            "payloads": self.fragment("payloads", details["state"]),
            "timeline": self.fragment("timeline", details["geometry"]),
        }

    async def instance_page(self, request: Request) -> Response:
        instance_id = request.path_params["instance_id"]
        which = _event_filter(request)
        state, history = await self._instance(instance_id)
        live = (
            f"/api/live/instance/{quote(instance_id, safe='')}?execution="
            f"{quote(state.execution_id, safe='')}&shown={len(history)}&events={which.value}"
        )

        def rows() -> Iterator[hist.Row]:
            for row in hist.rows(history):
                if hist.keep(row, which):
                    yield row

        return self.streamed(
            "instance.html",
            title=f"Instance {instance_id}",
            live=live,
            rows=rows(),
            total=len(history),
            which=which.value,
            **self._details(state, history),
        )

    async def instance_api(self, request: Request) -> Response:
        instance_id = request.path_params["instance_id"]
        if request.method == "POST":
            body = await _body(request)
            action = Action.parse(body.get("action"))
            done = await act(self.client, instance_id, action, body)
            log.info("%s: %s from the dashboard", instance_id, action.value)
            return JSONResponse({"instanceId": done.instance_id, "changed": done.changed})
        state, history = await self._instance(instance_id)
        line = hist.timeline(history)
        out = instance_json(state)
        out["children"] = children_of(history)
        out["historyLength"] = len(history)
        out["timeline"] = {
            "bars": [
                {
                    "kind": b.kind.value,
                    "name": b.label,
                    "start": iso(b.start),
                    "end": iso(b.end),
                    "failed": b.failed,
                }
                for b in line.bars
            ],
            "marks": [{"kind": m.kind, "label": m.label, "at": iso(m.at)} for m in line.marks],
        }
        return JSONResponse(out)

    async def history_api(self, request: Request) -> Response:
        """The history as a JSON array of events in the protocol's JSON form, streamed."""
        instance_id = request.path_params["instance_id"]
        _, history = await self._instance(instance_id)

        async def chunks() -> AsyncIterator[bytes]:
            yield b"["
            for start in range(0, len(history), HISTORY_JSON_CHUNK):
                part = history[start : start + HISTORY_JSON_CHUNK]
                text = ",\n".join(json.dumps(event_json(e)) for e in part)
                yield (",\n" if start else "\n").encode() + text.encode()
                await trio.lowlevel.checkpoint()
            yield b"\n]\n"

        headers = {"cache-control": "no-store"}
        if request.query_params.get("download"):
            name = re.sub(r"[^A-Za-z0-9._-]", "_", instance_id)[:100]
            headers["content-disposition"] = f'attachment; filename="{name}-history.json"'
        return StreamingResponse(chunks(), media_type="application/json", headers=headers)

    async def instance_live(self, request: Request) -> Response:
        instance_id = request.path_params["instance_id"]
        execution = request.query_params.get("execution", "")
        which = _event_filter(request)
        try:
            shown = int(request.query_params.get("shown", "0"))
        except ValueError:
            raise InvalidRequest("shown must be a number of history events") from None
        previous: dict[str, str] = {}

        async def render() -> Update:
            nonlocal shown, previous
            state = await self.store.get_instance(instance_id)
            if state is None:
                return Update(gone=True)
            if state.execution_id != execution:
                return Update(reload=True)
            history = await self.store.get_history(instance_id)
            if len(history) < shown:
                return Update(reload=True)
            regions = self.instance_regions(self._details(state, history))
            update = Update(replace={k: v for k, v in regions.items() if previous.get(k) != v})
            previous = regions
            if which is hist.EventFilter.ALL:
                if len(history) > shown:
                    update.append["history-rows"] = str(
                        self.fragment("history_rows", hist.rows(history, shown))
                    )
            elif len(history) != shown:
                kept = [r for r in hist.rows(history) if hist.keep(r, which)]
                update.replace["history-rows"] = self.fragment("history_rows", kept)
            shown = len(history)
            return update

        return EventStream(
            lambda emit, ping: follow_instance(self.client.signals, instance_id, render, emit, ping)
        )

    async def bulk_api(self, request: Request) -> Response:
        body = await _body(request)
        action = Action.parse(body.get("action"))
        ids = body.get("ids")
        if ids is not None:
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise InvalidRequest("ids must be a list of instance ids")
            result = await bulk(self.client, action, ids, None)
        elif "filter" in body:
            where = query_from_json(body["filter"]).where()
            result = await bulk(self.client, action, None, where)
        else:
            raise InvalidRequest("give ids (a list of instance ids) or filter (an object)")
        return JSONResponse(
            {
                "action": action.value,
                "matched": result.matched,
                "done": result.done,
                "skipped": result.skipped,
                "errors": result.errors,
            }
        )

    # -- entities -------------------------------------------------------------------------

    async def entity_list(self, query: EntityQuery) -> tuple[list[EntityState], str | None]:
        where = EntityFilter(id_prefix=entity_id_prefix(query.prefix), include_transient=True)
        return await self.store.query_entities(where, PAGE_SIZE, query.after)

    async def entities_page(self, request: Request) -> Response:
        query = EntityQuery.parse(_params(request))
        entities, after = await self.entity_list(query)
        live = query.url().replace("/entities", "/api/live/entities", 1)
        return self.page(
            "entities.html",
            title="Entities",
            query=query,
            entities=entities,
            next_url=query.url(after=after) if after else None,
            live=live,
        )

    async def entities_api(self, request: Request) -> Response:
        query = EntityQuery.parse(_params(request))
        entities, after = await self.entity_list(query)
        return JSONResponse(
            {
                "entities": [entity_json(e) for e in entities],
                "next": query.url(after=after).replace("/entities", "/api/entities", 1)
                if after
                else None,
            }
        )

    async def entities_live(self, request: Request) -> Response:
        query = EntityQuery.parse(_params(request))

        async def render() -> dict[str, str]:
            entities, _ = await self.entity_list(query)
            return {"entity-rows": self.fragment("entity_rows", entities)}

        return EventStream(
            lambda emit, ping: follow_hub(self.client.signals.changes, render, emit, ping)
        )

    async def entity_or_none(self, entity_id: str) -> tuple[str, EntityState | None]:
        try:
            entity_id = check_entity_id(entity_id, "entity id")
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        return entity_id, await self.store.get_entity(entity_id)

    async def entity_page(self, request: Request) -> Response:
        entity_id, entity = await self.entity_or_none(request.path_params["entity_id"])
        live = f"/api/live/entity/{quote(entity_id, safe='')}"
        return self.page(
            "entity.html",
            title=f"Entity {entity_id}",
            entity_id=entity_id,
            entity=entity,
            live=live,
        )

    async def entity_api(self, request: Request) -> Response:
        entity_id, entity = await self.entity_or_none(request.path_params["entity_id"])
        if request.method == "POST":
            body = await _body(request)
            if body.get("action") != "signal":
                raise InvalidRequest("action must be 'signal'")
            operation = body.get("operation")
            data = body.get("input")
            if not isinstance(operation, str) or (data is not None and not isinstance(data, str)):
                raise InvalidRequest("operation must be a string, input JSON text")
            if data:
                try:
                    json.loads(data)
                except ValueError as exc:
                    raise InvalidRequest(f"input is not JSON ({exc})") from None
            await self.client.signal_entity(entity_id, operation, data or None)
            return JSONResponse({"entityId": entity_id, "signaled": operation})
        if entity is None:
            return JSONResponse({"error": f"no entity with id '{entity_id}'"}, 404)
        return JSONResponse(entity_json(entity))

    async def entity_live(self, request: Request) -> Response:
        entity_id, _ = await self.entity_or_none(request.path_params["entity_id"])

        async def render() -> dict[str, str]:
            entity = await self.store.get_entity(entity_id)
            return {"entity": self.fragment("entity_details", entity_id, entity)}

        return EventStream(
            lambda emit, ping: follow_hub(self.client.signals.changes, render, emit, ping)
        )


def _key(state: InstanceState) -> tuple[int, str]:
    """The store's page key of an instance: (created time in microseconds, id)."""
    return (state.created_at - _EPOCH) // _MICROSECOND, state.instance_id


def _event_filter(request: Request) -> hist.EventFilter:
    value = request.query_params.get("events", "all")
    try:
        return hist.EventFilter(value)
    except ValueError:
        raise InvalidRequest(f"events '{value[:50]}' is none of all, failed, pending") from None


def create_app(client: HubClient, guard: Guard, probes: Probes | None = None) -> ASGIApp:
    """The dashboard of the hub `client` works on, behind `guard`, with `probes` (/metrics,
    /healthz, /readyz: open without the token) beside it."""
    dashboard = Dashboard(client, guard)
    app = Starlette(
        routes=[*dashboard.routes(), *(probes.routes() if probes is not None else ())],
        exception_handlers={DtTrioError: dashboard.on_error, HTTPException: dashboard.on_error},
    )
    return GuardMiddleware(app, guard)
