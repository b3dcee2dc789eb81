"""The `dt-trio` command: arguments, logging, signals."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence

import trio

from dt_trio._dashboard import DEFAULT_UI, parse_address
from dt_trio._errors import StoreUnavailable
from dt_trio._grpc._transport import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_MESSAGE_BYTES,
    min_buffered_bytes,
    server_ssl_context,
)
from dt_trio._health import Health
from dt_trio._hub import DEFAULT_DB, DEFAULT_HOST, DEFAULT_PORT, lone_error, serve
from dt_trio._log import get_logger
from dt_trio._log_json import JsonFormatter
from dt_trio._store import (
    DEFAULT_HUB,
    DEFAULT_LEASE_TTL,
    Durability,
    InvalidHubName,
    check_hub,
    is_postgres_address,
)

log = get_logger("dt_trio")


def _is_loopback(parser: argparse.ArgumentParser, flag: str, host: str) -> bool:
    """Whether `host` (an address or a name, given with `flag`) is served on loopback only; a
    parser error if it is no valid address and no name this machine can resolve."""
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        if not host or all(char in "0123456789." for char in host) or ":" in host:
            parser.error(f"{flag} {host} is not a valid IP address")
        try:
            found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            parser.error(f"{flag} {host}: cannot resolve this name ({exc.strerror})")
        addresses = [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in found]
    return all(address.is_loopback for address in addresses)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dt-trio",
        description="Durable Task sidecar: serves TaskHubSidecarService over gRPC on sqlite "
        "or PostgreSQL.",
        epilog="To operate a running sidecar: dt-trio instances --help, dt-trio entities --help.",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="port to bind, 0 for any (default: %(default)s)",
    )
    parser.add_argument(
        "--db",
        default=f"./{DEFAULT_DB}",
        help='the store: an sqlite file, "" for an in-memory store, or a PostgreSQL database '
        "that several sidecars share, postgresql://user:password@host:5432/dbname "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--hub",
        default=None,
        help="task hub name in a PostgreSQL database: hubs share a database, sidecars of one "
        f"hub share its work (default: {DEFAULT_HUB})",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=None,
        metavar="SECONDS",
        help="PostgreSQL: how long a sidecar that died keeps its work from the others "
        f"(leases are renewed while it lives; default: {DEFAULT_LEASE_TTL:g})",
    )
    parser.add_argument(
        "--durability",
        type=Durability,
        choices=list(Durability),
        default=Durability.NORMAL,
        help="normal: a commit survives the sidecar's crash; full: also an OS crash or power "
        "loss (sqlite synchronous=FULL: a sync per group commit; needs a file; PostgreSQL "
        "synchronous_commit=on) (default: %(default)s)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest request message; bigger ones get RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    parser.add_argument(
        "--max-buffered-bytes",
        type=int,
        help="request bytes held at once across all connections (a call waiting for its "
        "request counts 4096); a call that would go beyond gets RESOURCE_EXHAUSTED "
        "(default: 64 MiB, or 4 x --max-message-bytes if more)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="connections served at once; more are refused (default: %(default)s)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection that has not begun HTTP/2 (and TLS) by then "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection without calls for that long (default: %(default)s)",
    )
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve TLS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--token",
        default=os.environ.get("DT_TRIO_TOKEN") or None,
        help="require 'authorization: Bearer TOKEN' on every call (default: $DT_TRIO_TOKEN)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host or --ui without TLS",
    )
    parser.add_argument(
        "--ui",
        default=DEFAULT_UI,
        metavar="HOST:PORT",
        help="serve the web dashboard here, port 0 for any (default: %(default)s)",
    )
    parser.add_argument("--no-ui", action="store_true", help="do not serve the dashboard")
    parser.add_argument(
        "--ui-read-only", action="store_true", help="a dashboard that shows but cannot act"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="of dt-trio's own log lines; other libraries log at INFO or above "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object a line, event fields as keys (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, not {args.port}")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if not _is_loopback(parser, "--host", args.host) and not args.tls_cert and not args.insecure:
        parser.error(
            f"--host {args.host} is reachable from other machines: give --tls-cert and "
            "--tls-key (and preferably --token), or --insecure to serve plaintext anyway"
        )
    if not is_postgres_address(args.db):
        for flag, value in (("--hub", args.hub), ("--lease-ttl", args.lease_ttl)):
            if value is not None:
                parser.error(f"{flag} is for a PostgreSQL --db (an sqlite file holds one hub)")
    try:
        args.hub = check_hub(args.hub or DEFAULT_HUB)
    except InvalidHubName as exc:
        parser.error(str(exc))
    if args.lease_ttl is None:
        args.lease_ttl = DEFAULT_LEASE_TTL
    elif not 1 <= args.lease_ttl <= 3600:
        parser.error(f"--lease-ttl must be between 1 and 3600 seconds, not {args.lease_ttl:g}")
    try:
        ui_host = parse_address(args.ui)[0]
    except ValueError as exc:
        parser.error(f"--ui {exc}")
    if (
        not args.no_ui
        and not _is_loopback(parser, "--ui", ui_host)
        and not args.tls_cert
        and not args.insecure
    ):
        parser.error(
            f"--ui {args.ui} is reachable from other machines: give --tls-cert and --tls-key "
            "(and preferably --token), or --insecure to serve plaintext anyway, or --no-ui"
        )
    if args.durability is Durability.FULL and not args.db:
        parser.error("--durability full needs a store file: an in-memory store keeps nothing")
    if args.max_message_bytes < 1024:
        parser.error(f"--max-message-bytes must be at least 1024, not {args.max_message_bytes}")
    least = min_buffered_bytes(args.max_message_bytes)
    if args.max_buffered_bytes is not None and args.max_buffered_bytes < least:
        parser.error(
            f"--max-buffered-bytes must be at least {least} (a request of --max-message-bytes "
            f"and its call), not {args.max_buffered_bytes}"
        )
    if args.max_connections < 1:
        parser.error(f"--max-connections must be at least 1, not {args.max_connections}")
    for flag, seconds in (
        ("--handshake-timeout", args.handshake_timeout),
        ("--idle-timeout", args.idle_timeout),
    ):
        if not seconds > 0:  # (NaN too)
            parser.error(f"{flag} must be a positive number of seconds, not {seconds}")
    args.ssl_context = None
    if args.tls_cert:
        try:
            args.ssl_context = server_ssl_context(args.tls_cert, args.tls_key)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def _signal_while_shutting_down(signum: int, frame: object) -> None:
    log.info("received %s while shutting down; the shutdown goes on", signal.Signals(signum).name)


async def run(args: argparse.Namespace) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly (health watchers told first). A
    further signal during the shutdown is logged and changes nothing: the shutdown is short,
    and a user who cannot wait may kill -9 (which loses nothing committed)."""
    # In force once the receiver below is closed: a signal still queued in it when it
    # closes is delivered again, and must not kill the process on its way out.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _signal_while_shutting_down)
    health = Health()
    serving = trio.CancelScope()

    async def watch(signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if serving.cancel_called:
                _signal_while_shutting_down(signum, None)
            else:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                await health.drain()
                serving.cancel()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, signals)
                with serving:
                    await serve(
                        host=args.host,
                        port=args.port,
                        db=args.db,
                        durability=args.durability,
                        hub=args.hub,
                        lease_ttl=args.lease_ttl,
                        max_message_bytes=args.max_message_bytes,
                        max_buffered_bytes=args.max_buffered_bytes,
                        max_connections=args.max_connections,
                        handshake_timeout=args.handshake_timeout,
                        idle_timeout=args.idle_timeout,
                        ssl_context=args.ssl_context,
                        token=args.token,
                        ui=None if args.no_ui else args.ui,
                        ui_read_only=args.ui_read_only,
                        health=health,
                    )
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise lone_error(group) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # DEBUG is for dt-trio's own loggers only: other libraries' debug output is not ours to
    # vouch for (hpack's shows every header block, the token included).
    level = logging.getLevelName(args.log_level)
    logging.basicConfig(
        level=max(level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The store says once when it cannot reach PostgreSQL and once when it can again; the
    # pool's own warning for every attempt in between says nothing more.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    log.setLevel(level)
    if args.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    try:
        trio.run(run, args)
    except (OSError, StoreUnavailable) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
