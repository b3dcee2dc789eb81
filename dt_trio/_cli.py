"""The `dt-trio` command: arguments, logging, signals."""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from dt_trio._errors import StoreUnavailable
from dt_trio._grpc._transport import DEFAULT_MAX_MESSAGE_BYTES, server_ssl_context
from dt_trio._hub import DEFAULT_DB, DEFAULT_HOST, DEFAULT_PORT, lone_error, serve
from dt_trio._store import (
    DEFAULT_HUB,
    DEFAULT_LEASE_TTL,
    InvalidHubName,
    check_hub,
    is_postgres_address,
)

log = logging.getLogger("dt_trio")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dt-trio",
        description="Durable Task sidecar: serves TaskHubSidecarService over gRPC on sqlite "
        "or PostgreSQL.",
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
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest request message; bigger ones get RESOURCE_EXHAUSTED (default: %(default)s)",
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
        help="allow a non-loopback --host without TLS",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, not {args.port}")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if not _is_loopback(args.host) and not args.tls_cert and not args.insecure:
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
    if args.max_message_bytes < 1024:
        parser.error(f"--max-message-bytes must be at least 1024, not {args.max_message_bytes}")
    return args


async def run(args: argparse.Namespace) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    functools.partial(
                        serve,
                        host=args.host,
                        port=args.port,
                        db=args.db,
                        hub=args.hub,
                        lease_ttl=args.lease_ttl,
                        max_message_bytes=args.max_message_bytes,
                        ssl_context=server_ssl_context(args.tls_cert, args.tls_key)
                        if args.tls_cert
                        else None,
                        token=args.token,
                    )
                )
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
        except BaseExceptionGroup as group:
            raise lone_error(group) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The store says once when it cannot reach PostgreSQL and once when it can again; the
    # pool's own warning for every attempt in between says nothing more.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    try:
        trio.run(run, args)
    except (OSError, StoreUnavailable) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
