"""The dashboard's guards, in front of every request: the Host a browser asked for, the token,
the Origin of state-changing requests, read-only mode, and the headers of every response."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "dt_trio_session"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),  # "no-referrer" would make form posts say Origin: null
    (b"cross-origin-opener-policy", b"same-origin"),
]
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Reachable without the token: the login page and what it is drawn with; and the probes
# (scrapers and the kubelet send no token; see dt_trio/_metrics/_http.py).
_OPEN_PATHS = ("/login", "/static/", "/favicon.ico")
_PROBES = frozenset({"/metrics", "/healthz", "/readyz"})


def session_value(token: str) -> str:
    """The cookie that stands for the token (not the token itself): a keyed hash of it."""
    return hmac.new(token.encode(), b"dt-trio dashboard session", hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Guard:
    """`token`: required (as the session cookie, or `Authorization: Bearer`); `loopback`:
    the dashboard listens on loopback only, so a Host naming anything else is a page of
    another site whose name was pointed at 127.0.0.1 (DNS rebinding), refused."""

    token: str | None
    read_only: bool
    loopback: bool
    tls: bool

    def authenticated(self, headers: dict[str, str]) -> bool:
        if self.token is None:
            return True
        given = headers.get("authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(
            given[7:].encode(), self.token.encode()
        ):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except CookieError:  # a malformed Cookie header is no session
            return False
        morsel = cookie.get(COOKIE)
        return morsel is not None and hmac.compare_digest(
            morsel.value.encode(), session_value(self.token).encode()
        )

    def cookie_header(self) -> str:
        assert self.token is not None
        secure = "; Secure" if self.tls else ""
        return f"{COOKIE}={session_value(self.token)}; Path=/; HttpOnly; SameSite=Strict{secure}"


def _names_loopback(host: str) -> bool:
    """Whether a Host header names this machine's loopback (any port)."""
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class GuardMiddleware:
    """ASGI middleware applying a `Guard` to every HTTP request."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path: str = scope["path"]
        method: str = scope["method"]
        refusal = self._refusal(headers, path, method, scope.get("scheme", "http"))
        if refusal is not None:
            status, message = refusal
            if status == 401 and method == "GET" and not path.startswith("/api/"):
                target = path + (
                    "?" + scope["query_string"].decode() if scope["query_string"] else ""
                )
                await _send(
                    send, 303, b"", [(b"location", f"/login?next={quote(target)}".encode())]
                )
            else:
                body = json.dumps({"error": message}).encode()
                await _send(send, status, body, [(b"content-type", b"application/json")])
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(
        self, headers: dict[str, str], path: str, method: str, scheme: str
    ) -> tuple[int, str] | None:
        host = headers.get("host", "")
        if self.guard.loopback and not _names_loopback(host):
            return 421, f"this dashboard answers to localhost only, not to '{host[:100]}'"
        if method not in _SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and origin != f"{scheme}://{host}":
                return 403, f"cross-origin request from '{origin[:100]}' refused"
            site = headers.get("sec-fetch-site")
            if origin is None and site not in (None, "same-origin", "none"):
                return 403, "cross-site request refused"
        if path.startswith(_OPEN_PATHS) or path in _PROBES:
            return None
        if not self.guard.authenticated(headers):
            return 401, "this dashboard needs the sidecar's token: log in at /login"
        if self.guard.read_only and method not in _SAFE_METHODS:
            return 403, "the dashboard is read-only (--ui-read-only)"
        return None


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode()), *_HEADERS],
        }
    )
    await send({"type": "http.response.body", "body": body})
