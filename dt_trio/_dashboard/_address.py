"""Where the dashboard listens: its default address and the HOST:PORT syntax (cheap to import:
the command parses its flags with it)."""

from __future__ import annotations

import ipaddress

DEFAULT_UI = "127.0.0.1:8233"


def parse_address(value: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' as (host, port); ValueError with a message otherwise."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"'{value}' is not HOST:PORT (with a port between 0 and 65535)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable
