"""THE nursery: what runs in a dt-trio task hub, in which order it starts and stops.

    serve()                       open_task_hub()  (the same, without gRPC)
    └── gRPC listening sockets (bound first: a port in use fails the start before any file
        │                       is made; serve only)
        store (opened next, closed last)
        └── store nursery
            ├── store's own duties (`Backend.run`): sqlite's group-commit writer;
            │   PostgreSQL's lease renewals, wake-ups and poll   -- started 1st, stopped last
            └── nursery
                ├── gRPC server (TaskHubSidecarService, Health)    -- started 2nd (serve only)
                ├── store watch: while the store has a fault, tries a write now and then
                ├── dashboard (hypercorn, Starlette; with `ui`)    -- started 3rd
                │   with /metrics, /healthz, /readyz beside it
                ├── /metrics, /healthz, /readyz alone (with `metrics`) -- started 4th
                ├── orchestration processor  ─┐ serve the lanes of  -- started 5th
                ├── activity processor        │ one dispatcher      -- started 6th
                └── entity processor         ─┘                     -- started 7th

The executor routes each work item to this process's own Python code (a `Registry`, run by the
local executor) or to the SDK workers connected over gRPC (the remote executor, whose worker
streams are served by the gRPC server). Commits wake the processors through `Signals`; the
dispatcher hands the work a commit makes for this process straight to the processor's lane.
The dashboard reads through the store and acts through the processors' client, as the gRPC
service does; the same signals drive its live pages. /metrics reads what the hub counted
(`Signals.tally`) and holds (its lanes, the remote executor's queues) as it is scraped.
Cancelling the hub (Ctrl-C, SIGTERM via the command, or the caller's cancel scope) cancels them
all; in-flight work items that were not committed are simply not committed, and their leases
are released when the store is opened next (sqlite) or as it closes (PostgreSQL; those of a
process that died expire). The store writer stops once the rest has: what
they queued on their way out (leases given back) is still committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import os
import socket
import ssl
import threading
import uuid
from collections.abc import AsyncIterator, Iterator

import trio

from dt_trio._engine import (
    ActivityProcessor,
    Dispatcher,
    EntityProcessor,
    HubClient,
    OrchestrationProcessor,
    RemoteExecutor,
    RoutingExecutor,
    Signals,
)
from dt_trio._grpc._health import HealthService
from dt_trio._grpc._service import SidecarService
from dt_trio._grpc._status import status_for
from dt_trio._grpc._transport import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_MESSAGE_BYTES,
    bound_port,
    open_listeners,
    serve_grpc,
)
from dt_trio._health import Health, watch_store
from dt_trio._local import Client, LocalExecutor, Registry
from dt_trio._log import get_logger
from dt_trio._store import DEFAULT_HUB, DEFAULT_LEASE_TTL, Backend, Durability, make_store

log = get_logger("dt_trio")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4001
DEFAULT_DB = "taskhub.sqlite3"


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def lone_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """A nursery's group holding a single failure (Ctrl-C under trio.run, a port in use), as
    that failure itself, so callers can catch it the usual way; any other group unchanged."""
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner  # nested nurseries: the store's around the hub's
    return group


async def serve(
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    db: str = DEFAULT_DB,
    hub: str = DEFAULT_HUB,
    lease_ttl: float = DEFAULT_LEASE_TTL,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_buffered_bytes: int | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
    token: str | None = None,
    registry: Registry | None = None,
    ui: str | None = None,
    ui_read_only: bool = False,
    metrics: str | None = None,
    health: Health | None = None,
    durability: Durability = Durability.NORMAL,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a task hub sidecar until cancelled.

    `db` is an sqlite file (created if missing), "" for an in-memory store, or a PostgreSQL
    database (postgresql://user:password@host:port/dbname) that several sidecars may share:
    `hub` names the task hub in it, `lease_ttl` is how long (seconds) a sidecar that died keeps
    its work from the others. `port` 0 picks a free port. A request message larger than
    `max_message_bytes` is answered RESOURCE_EXHAUSTED, and so is one that would take the
    request bytes held across all connections beyond `max_buffered_bytes` (default 64 MiB, or 4
    x `max_message_bytes` if more). At most `max_connections` connections are served at once;
    one that has not begun HTTP/2 (TLS included) `handshake_timeout` seconds after it was
    accepted is closed, and so is one without calls for `idle_timeout` seconds. `ssl_context`
    serves TLS; `token` requires every call to carry `authorization: Bearer <token>`.
    Orchestrators and activities in `registry` run in this process, everything else on connected
    SDK workers. With `ui` ('HOST:PORT', port 0 for any) the web dashboard is served there too
    (with the same TLS and token; `ui_read_only` hides and refuses its actions); the `dt-trio`
    command serves it by default, this function does not. The dashboard's port also serves
    /metrics (Prometheus), /healthz and /readyz, without the token; with `metrics`
    ('HOST:PORT') those three are served there too (with the same TLS). Reports `(host, port)`
    through `task_status` once everything is running. `durability` FULL makes every commit
    survive an OS crash or power loss too (see `Durability`; sqlite needs a file). Cancellation
    stops the servers and the processors and closes the store. `health` is the readiness the
    gRPC health service and /readyz report (the command drains its watchers before it
    cancels); a new one if not given.
    """
    signals = Signals(health)
    # The addresses first: a start that fails for want of one (a port in use) must not have
    # created the store's files.
    listeners = await open_listeners(host, port)
    try:
        async with _running_hub(db, signals, hub, lease_ttl, durability, ui, metrics) as running:
            nursery = running.nursery
            remote = RemoteExecutor()
            processors = _Processors(running.store, signals, registry, remote)
            service = SidecarService(running.store, remote, processors.client)
            checks = HealthService(signals.health, [service.service.name])
            nursery.start_soon(watch_store, signals.health, running.store.try_write)
            await nursery.start(
                functools.partial(
                    serve_grpc,
                    [service, checks],
                    listeners,
                    status_for=status_for,
                    max_message_bytes=max_message_bytes,
                    max_buffered_bytes=max_buffered_bytes,
                    max_connections=max_connections,
                    handshake_timeout=handshake_timeout,
                    idle_timeout=idle_timeout,
                    ssl_context=ssl_context,
                    token=token,
                )
            )
            address = (host, bound_port(listeners))
            log.info("server listening at %s", format_address(*address))
            await processors.serve_http(
                nursery,
                running.ui_socket,
                running.metrics_socket,
                read_only=ui_read_only,
                token=token,
                ssl_context=ssl_context,
            )
            await processors.start(nursery)
            signals.health.update(listening=True)
            task_status.started(address)
    finally:
        # (serve_grpc closes them, if it got to run)
        for listener in listeners:
            listener.socket.close()


@contextlib.asynccontextmanager
async def open_task_hub(
    db: str = DEFAULT_DB,
    *,
    registry: Registry,
    hub: str = DEFAULT_HUB,
    lease_ttl: float = DEFAULT_LEASE_TTL,
    ui: str | None = None,
    ui_read_only: bool = False,
    metrics: str | None = None,
    durability: Durability = Durability.NORMAL,
) -> AsyncIterator[Client]:
    """Run a task hub in this process, without gRPC, for the body of an ``async with``.

    Yields the `Client` of the hub. Orchestrators and activities in `registry` run here; the
    store is `db` (an sqlite file, "" in memory, or a PostgreSQL address), committed with
    `durability` (see `serve`). With `ui` ('HOST:PORT', port 0 for any; off by default) the
    web dashboard is served there, plain HTTP without a token (keep it on loopback);
    `ui_read_only` hides and refuses its actions. /metrics, /healthz and /readyz are served
    on the dashboard's port, and with `metrics` ('HOST:PORT') there (plain HTTP too). Leaving
    the block stops the hub: work in flight that was not committed runs again when a hub
    opens the store next.
    """
    signals = Signals()
    async with _running_hub(db, signals, hub, lease_ttl, durability, ui, metrics) as running:
        processors = _Processors(running.store, signals, registry, RemoteExecutor())
        await processors.serve_http(
            running.nursery, running.ui_socket, running.metrics_socket, read_only=ui_read_only
        )
        await processors.start(running.nursery)
        signals.health.update(listening=True)  # (no gRPC: ready once work runs)
        yield Client(processors.client, registry)
        running.nursery.cancel_scope.cancel()


@dataclasses.dataclass(frozen=True)
class _Running:
    store: Backend
    nursery: trio.Nursery  # the hub's, inside the store's
    ui_socket: socket.socket | None
    metrics_socket: socket.socket | None


@contextlib.asynccontextmanager
async def _running_hub(
    db: str,
    signals: Signals,
    hub: str,
    lease_ttl: float,
    durability: Durability,
    ui: str | None,
    metrics: str | None,
) -> AsyncIterator[_Running]:
    """What serve and open_task_hub both run in: the dashboard's and /metrics' sockets
    listening (before the store: see serve), the store running and the hub's nursery. Leaving
    closes the sockets (the HTTP servers close them too, if they got to run); a lone failure
    comes out as itself (`lone_error`)."""
    http_sockets: list[socket.socket] = []
    try:
        ui_socket = _listen_http(ui, http_sockets)
        metrics_socket = _listen_http(metrics, http_sockets)
        with _collections_spaced():
            async with (
                _running_store(db, signals, hub, lease_ttl, durability) as store,
                trio.open_nursery() as nursery,
            ):
                yield _Running(store, nursery, ui_socket, metrics_socket)
    except BaseExceptionGroup as group:
        raise lone_error(group) from None
    finally:
        for sock in http_sockets:
            sock.close()


def _listen_http(address: str | None, sockets: list[socket.socket]) -> socket.socket | None:
    """A listening socket for the dashboard or /metrics at `address`, if there is to be one,
    also added to `sockets`."""
    if address is None:
        return None
    from dt_trio._dashboard._server import listen_dashboard  # its imports take 0.1 s

    sock = listen_dashboard(address)
    sockets.append(sock)
    return sock


# A hub's state in flight (histories, parked steps, orchestrators waiting between steps) lives
# long and makes no cyclic garbage, but the collector's default first threshold (700 net
# allocations) has it scanned again and again: 15% of a busy local hub's time, measured. What
# the process held before the first hub started (modules, the application's own objects) is
# moved out of the collector's sight while hubs run (gc.freeze): the oldest generation's
# collections that the hub's state brings on then do not scan it all again.
GC_YOUNG_THRESHOLD = 50_000
_hubs_running = 0
_thresholds_before: tuple[int, int, int] | None = None
_froze = False  # the first hub froze the process's objects (not if the application had)
_hubs_lock = threading.Lock()  # hubs may run in several threads' trio runs


@contextlib.contextmanager
def _collections_spaced() -> Iterator[None]:
    """While hubs run in this process, the garbage collector's youngest generation is
    collected after GC_YOUNG_THRESHOLD net allocations instead of the default 700 (a higher
    threshold set by the application stays), and what the process held before is frozen;
    the last hub to stop restores the thresholds and unfreezes it (garbage among it is then
    collected as usual)."""
    global _hubs_running, _thresholds_before, _froze
    with _hubs_lock:
        if _hubs_running == 0:
            _thresholds_before = gc.get_threshold()
            if _thresholds_before[0] < GC_YOUNG_THRESHOLD:
                gc.set_threshold(GC_YOUNG_THRESHOLD, *_thresholds_before[1:])
            _froze = gc.get_freeze_count() == 0
            if _froze:
                gc.freeze()
        _hubs_running += 1
    try:
        yield
    finally:
        with _hubs_lock:
            _hubs_running -= 1
            if _hubs_running == 0 and _thresholds_before is not None:
                gc.set_threshold(*_thresholds_before)
                if _froze:
                    gc.unfreeze()


@contextlib.asynccontextmanager
async def _running_store(
    db: str, signals: Signals, hub: str, lease_ttl: float, durability: Durability
) -> AsyncIterator[Backend]:
    """The store, open and with its own duties running, for the body; they stop (after
    committing what the body queued) and the store closes when the body is done."""
    store = make_store(db, signals, hub=hub, lease_ttl=lease_ttl, durability=durability)
    await store.open()
    log.info("backend started: %s", store.description)
    signals.health.update(store_open=True)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            yield store
            nursery.cancel_scope.cancel()
    finally:
        signals.health.update(store_open=False)
        await store.close()
        log.info("backend stopped: %s", store.description)


class _Processors:
    """The three processors of a hub on one dispatcher, and the client whose starts hand new
    instances straight to the orchestration processor."""

    def __init__(
        self,
        store: Backend,
        signals: Signals,
        registry: Registry | None,
        remote: RemoteExecutor,
    ) -> None:
        local = LocalExecutor(registry) if registry is not None else None
        executor = RoutingExecutor(local, remote)
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        dispatch = Dispatcher(store, executor, owner)
        self.orchestrations = OrchestrationProcessor(dispatch, signals)
        self.activities = ActivityProcessor(dispatch, signals)
        self.entities = EntityProcessor(dispatch, signals)
        self.client = HubClient(store, signals, dispatch)
        self._signals = signals
        self._store = store
        self._remote = remote
        self._dispatch = dispatch

    async def serve_http(
        self,
        nursery: trio.Nursery,
        ui: socket.socket | None,
        metrics: socket.socket | None,
        *,
        read_only: bool,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Start the dashboard on `ui` and the probes alone on `metrics`, where given."""
        if ui is None and metrics is None:
            return
        # (imported only here: with prometheus-client and Starlette, 0.1 s)
        from dt_trio._dashboard._server import serve_dashboard
        from dt_trio._metrics._collector import HubView
        from dt_trio._metrics._http import Probes, serve_probes

        probes = Probes(HubView(self._signals, self._store, self._remote, self._dispatch))
        if ui is not None:
            await nursery.start(
                functools.partial(
                    serve_dashboard,
                    self.client,
                    ui,
                    read_only=read_only,
                    token=token,
                    ssl_context=ssl_context,
                    probes=probes,
                )
            )
        if metrics is not None:
            await nursery.start(
                functools.partial(serve_probes, probes, metrics, ssl_context=ssl_context)
            )

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.orchestrations.run)
        await nursery.start(self.activities.run)
        await nursery.start(self.entities.run)
