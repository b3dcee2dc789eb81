"""The operator commands' arguments: the parser tree and the values it checks.

Parsing imports nothing heavy (no trio, no protobuf), so `dt-trio instances --help` is quick and
a usage error costs no more than the parse.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import ssl

DEFAULT_ADDRESS = "127.0.0.1:4001"

# The OrchestrationStatus names of the protocol without their prefix, as --status takes them and
# the output shows them (tests/test_cli_ops.py checks them against the protocol's enum).
STATUS_NAMES = (
    "RUNNING",
    "COMPLETED",
    "CONTINUED_AS_NEW",
    "FAILED",
    "CANCELED",
    "TERMINATED",
    "PENDING",
    "SUSPENDED",
)

OUTPUTS = ("table", "json", "jsonl")

# Actions that take instance ids, or act on every instance matching the filter.
BULK_ACTIONS = {
    "terminate": "terminate running instances (their orchestrators see the termination)",
    "suspend": "suspend running instances",
    "resume": "resume suspended instances",
    "rewind": "run failed instances again from their failed steps",
    "restart": "start finished instances again with their input",
    "purge": "delete finished instances and their history",
}


@dataclass(frozen=True)
class Target:
    """Where the sidecar is and how to reach it."""

    host: str
    port: int
    token: str | None
    ssl_context: ssl.SSLContext | None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def status_name(text: str) -> str:
    name = text.strip().upper().replace("-", "_")
    if name not in STATUS_NAMES:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a status; choose from {', '.join(STATUS_NAMES)} (any case)"
        )
    return name


def iso_time(text: str) -> datetime:
    """An ISO 8601 time; one without a time zone is UTC, as the sidecar's times are."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not an ISO 8601 time (e.g. 2024-05-01 or 2024-05-01T12:00:00Z)"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE")
    return key, value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive whole number")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive number of seconds")
    return value


def _connection_options() -> argparse.ArgumentParser:
    """The options every operator command takes."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("sidecar connection and output")
    group.add_argument(
        "--address",
        default=os.environ.get("DT_TRIO_ADDRESS") or DEFAULT_ADDRESS,
        help="the sidecar's HOST:PORT; https://HOST:PORT implies --tls "
        f"(default: $DT_TRIO_ADDRESS or {DEFAULT_ADDRESS})",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("DT_TRIO_TOKEN") or None,
        help="send 'authorization: Bearer TOKEN' (default: $DT_TRIO_TOKEN)",
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument(
        "--ca-cert",
        metavar="FILE",
        help="PEM certificate(s) to trust, e.g. a self-signed sidecar's (implies --tls)",
    )
    group.add_argument(
        "-o",
        "--output",
        choices=OUTPUTS,
        default="table",
        help="an aligned table, one JSON document, or one JSON object a line (default: table)",
    )
    return common


def _filter_options() -> argparse.ArgumentParser:
    filters = argparse.ArgumentParser(add_help=False)
    group = filters.add_argument_group("filter (all given must match)")
    group.add_argument(
        "--status",
        type=status_name,
        action="append",
        metavar="STATUS",
        help=f"runtime status, repeatable: {', '.join(STATUS_NAMES)} (any case)",
    )
    group.add_argument("--name", help="orchestration name (exact)")
    group.add_argument("--prefix", help="instance id prefix")
    group.add_argument(
        "--created-after", type=iso_time, metavar="TIME", help="created at or after (ISO 8601)"
    )
    group.add_argument(
        "--created-before", type=iso_time, metavar="TIME", help="created before (ISO 8601)"
    )
    return filters


def _add(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    parents: list[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    leaf = commands.add_parser(
        name, help=help, description=help[0].upper() + help[1:] + ".", parents=parents
    )
    leaf.set_defaults(command=name, usage_error=leaf.error)
    return leaf


def build_parser() -> argparse.ArgumentParser:
    """The `dt-trio instances ...` and `dt-trio entities ...` parsers."""
    common, filters = _connection_options(), _filter_options()
    top = argparse.ArgumentParser(
        prog="dt-trio",
        description="Operate a running Durable Task sidecar (dt-trio or any other) over gRPC. "
        "Run `dt-trio` with no command to serve one.",
    )
    groups = top.add_subparsers(dest="group", required=True, metavar="{instances,entities}")

    instances = groups.add_parser(
        "instances",
        help="orchestration instances",
        description="List, inspect and act on orchestration instances. The actions take "
        "instance ids, or a filter to act on every instance matching it (after a confirmation "
        "that says how many; --yes skips it).",
    )
    commands = instances.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = _add(commands, "list", "list instances matching the filter", [filters, common])
    listing.add_argument("--limit", type=positive, help="show at most this many")
    listing.add_argument("--payloads", action="store_true", help="include inputs and outputs")
    show = _add(commands, "show", "one instance's state, input and output", [common])
    show.add_argument("instance_id", metavar="ID")
    history = _add(commands, "history", "an instance's history events", [common])
    history.add_argument("instance_id", metavar="ID")
    start = _add(commands, "start", "start an orchestration", [common])
    start.add_argument("name", metavar="NAME", help="the orchestrator's name")
    start.add_argument("--id", dest="instance_id", help="instance id (default: a new UUID)")
    start.add_argument("--input", help="input text, JSON for the SDKs (e.g. '\"Tokyo\"')")
    start.add_argument("--version", help="orchestration version")
    start.add_argument(
        "--tag", type=tag, action="append", metavar="KEY=VALUE", help="a tag, repeatable"
    )
    start.add_argument("--start-at", type=iso_time, metavar="TIME", help="start later (ISO 8601)")
    wait = _add(commands, "wait", "wait until an instance finishes, then show it", [common])
    wait.add_argument("instance_id", metavar="ID")
    wait.add_argument("--start", action="store_true", help="wait only until it has started")
    wait.add_argument("--timeout", type=seconds, help="give up after this many seconds")
    raise_event = _add(commands, "raise-event", "send an event to an instance", [common])
    raise_event.add_argument("instance_id", metavar="ID")
    raise_event.add_argument("event", metavar="EVENT", help="the event's name")
    raise_event.add_argument("--input", help="the event's data, JSON for the SDKs")
    for name, help in BULK_ACTIONS.items():
        action = _add(commands, name, help, [filters, common])
        action.add_argument(
            "instance_ids", metavar="ID", nargs="*", help="instance ids (none: use the filter)"
        )
        action.add_argument(
            "-y", "--yes", action="store_true", help="act on a filter's matches without asking"
        )
        if name == "terminate":
            action.add_argument(
                "--result", metavar="TEXT", help="the instances' output, JSON for the SDKs"
            )
        if name in ("suspend", "resume", "rewind"):
            action.add_argument("--reason", help="recorded in the history")
        if name in ("terminate", "purge"):
            action.add_argument(
                "--recursive",
                action=argparse.BooleanOptionalAction,
                default=True,
                help="also the sub-orchestrations (default: yes)",
            )
        if name == "restart":
            action.add_argument("--new-id", action="store_true", help="under a new instance id")

    entities = groups.add_parser(
        "entities", help="durable entities", description="List, inspect and signal entities."
    )
    commands = entities.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = _add(commands, "list", "list entities with their state", [common])
    listing.add_argument("--prefix", help="entity id prefix: '@name@key', 'name' or 'name@key'")
    listing.add_argument(
        "--transient", action="store_true", help="also entities without state (locked, queued)"
    )
    listing.add_argument("--limit", type=positive, help="show at most this many")
    show = _add(commands, "show", "one entity's state", [common])
    show.add_argument("entity_id", metavar="ID", help="'@name@key' or 'name@key'")
    signal = _add(commands, "signal", "send an operation to an entity", [common])
    signal.add_argument("entity_id", metavar="ID", help="'@name@key' or 'name@key'")
    signal.add_argument("operation", metavar="OPERATION")
    signal.add_argument("--input", help="the operation's input, JSON for the SDKs")
    clean = _add(commands, "clean", "remove empty entities and release orphaned locks", [common])
    clean.add_argument(
        "--remove-empty",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="remove entities without state or pending work (default: yes)",
    )
    clean.add_argument(
        "--release-orphaned-locks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="release locks held by orchestrations that have finished (default: yes)",
    )
    return top


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The arguments with `target` (a Target) added; SystemExit(2) for a usage error."""
    args = build_parser().parse_args(argv)
    args.target = _target(args, args.usage_error)
    return args


def _target(args: argparse.Namespace, usage_error: Callable[[str], NoReturn]) -> Target:
    address, tls = args.address, args.tls or bool(args.ca_cert)
    for scheme, secure in (("https://", True), ("http://", False)):
        if address.startswith(scheme):
            address, tls = address[len(scheme) :], tls or secure
    host, sep, port = address.rstrip("/").rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        usage_error(f"--address '{args.address}' is not HOST:PORT")
    context = None
    if tls:
        import ssl  # here: most commands never need it

        try:
            context = ssl.create_default_context(cafile=args.ca_cert)
        except (OSError, ssl.SSLError) as exc:
            usage_error(f"cannot use --ca-cert {args.ca_cert}: {exc}")
        context.set_alpn_protocols(["h2"])  # gRPC is HTTP/2
    return Target(host, int(port), args.token, context)
