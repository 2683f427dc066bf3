"""The page's locks: an access token on every request, CSRF on every state change, safe headers.

One pure ASGI middleware, so that no route can forget it; path confinement is `workspace.py`'s.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any

COOKIE = "tuneforge_ui"
CSRF_FIELD = "_csrf"
CSRF_HEADER = "x-csrf-token"
MAX_BODY_BYTES = 1 << 20  # forms and chat messages; nothing the page sends is larger
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
#: No inline script, nothing from another origin; report.html (inline styles, data: images) fits.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'self'; form-action 'self'; "
    "base-uri 'none'; object-src 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    # same-origin, not no-referrer: under no-referrer browsers send `Origin: null` on form posts
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"SAMEORIGIN"),
    (b"cache-control", b"no-store"),
]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def new_token() -> str:
    return secrets.token_urlsafe(24)


class Keys:
    """The access token and what is derived from it: the session cookie and the CSRF token."""

    def __init__(self, token: str) -> None:
        if len(token) < 16:
            raise ValueError("the access token must be at least 16 characters")
        self.token = token
        self.session = self._derive("session")
        self.csrf = self._derive("csrf")

    def _derive(self, purpose: str) -> str:
        return hmac.new(self.token.encode(), purpose.encode(), hashlib.sha256).hexdigest()

    def token_ok(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.token.encode())

    def session_ok(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.session.encode())

    def csrf_ok(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.csrf.encode())


class Guard:
    """Token (a `?token=` visit sets an HttpOnly cookie and redirects), CSRF, body limit, headers."""

    def __init__(self, app: Callable, keys: Keys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_headers(send)
        headers = _headers(scope)
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "token" in query:
            await self._bootstrap(scope, query, send)
            return
        if not self._authenticated(headers):
            await _deny(
                send, 401, "missing or wrong access token: open the URL `tuneforge ui` printed"
            )
            return
        if scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        if not _same_origin(headers):
            await _deny(send, 403, "cross-origin request refused")
            return
        body = await _read_body(receive)
        if body is None:
            await _deny(send, 413, f"request body over {MAX_BODY_BYTES} bytes")
            return
        if not self.keys.csrf_ok(headers.get(CSRF_HEADER) or _form_field(headers, body)):
            await _deny(send, 403, "missing or wrong CSRF token: reload the page and try again")
            return
        await self.app(scope, _replay(body, receive), send)

    def _authenticated(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and self.keys.token_ok(auth[7:].strip()):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed cookie header is simply no session
            return False
        return COOKIE in cookie and self.keys.session_ok(cookie[COOKIE].value)

    async def _bootstrap(self, scope: Scope, query: dict[str, list[str]], send: Send) -> None:
        """A visit with ?token=...: set the session cookie and drop the token from the URL."""
        if not self.keys.token_ok(query["token"][0]):
            await _deny(send, 403, "wrong access token")
            return
        rest = {k: v for k, v in query.items() if k != "token"}
        location = scope.get("path", "/") + (
            "?" + urllib.parse.urlencode(rest, doseq=True) if rest else ""
        )
        cookie = f"{COOKIE}={self.keys.session}; HttpOnly; SameSite=Strict; Path=/"
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [(b"location", location.encode()), (b"set-cookie", cookie.encode())],
            }
        )
        await send({"type": "http.response.body", "body": b""})


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _same_origin(headers: dict[str, str]) -> bool:
    """An Origin header, when the browser sends one, must name this very host."""
    origin = headers.get("origin")
    if origin is None:
        return True
    return urllib.parse.urlsplit(origin).netloc == headers.get("host")


def _form_field(headers: dict[str, str], body: bytes) -> str | None:
    if not headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return None
    values = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get(CSRF_FIELD)
    return values[0] if values else None


async def _read_body(receive: Receive) -> bytes | None:
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, original: Receive) -> Receive:
    """The body already read, once; then the client's own messages (a disconnect, for streams)."""
    sent = False

    async def receive() -> MutableMapping[str, Any]:
        nonlocal sent
        if sent:
            return await original()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _with_headers(send: Send) -> Send:
    async def wrapped(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            names = {k.lower() for k, _ in message.get("headers", [])}
            extra = [(k, v) for k, v in HEADERS if k not in names]
            message["headers"] = list(message.get("headers", [])) + extra
        await send(message)

    return wrapped


async def _deny(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
