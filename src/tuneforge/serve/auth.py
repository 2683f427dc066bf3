"""API keys: stored as sha256 hashes, checked in constant time, sent as `Authorization: Bearer`.

`require_key` is the FastAPI dependency for routers; `KeyMiddleware` guards a whole app (every
path but the open ones) before any body is read. Neither ever logs or echoes a key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

from fastapi import Request

from tuneforge.errors import UsageError
from tuneforge.serve.apierrors import APIError, error_body

HASH_PREFIX = "sha256:"
MISSING = "Missing API key: send it as 'Authorization: Bearer <key>'."
WRONG = "Incorrect API key provided."


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random key (`tf-` + 43 url-safe characters, 256 bits)."""
    return "tf-" + secrets.token_urlsafe(32)


class ApiKeys:
    """A set of accepted keys, held only as hashes; `check` compares against all of them."""

    def __init__(self, keys: Iterable[str] = (), hashes: Iterable[str] = ()) -> None:
        self._hashes = [hash_key(k) for k in keys] + [h.lower() for h in hashes]
        if not self._hashes:
            raise UsageError("API keys: the key list is empty")

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        """One key per line (blank lines and `#` comments skipped); `sha256:<hex>` lines are
        already hashed, so the file need not hold any key in clear."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--api-key-file: cannot read {path}: {e.__class__.__name__}") from e
        keys, hashes = [], []
        for n, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(HASH_PREFIX):
                digest = line[len(HASH_PREFIX) :]
                if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
                    raise UsageError(f"--api-key-file: {path}:{n}: sha256: needs 64 hex digits")
                hashes.append(digest)
            elif len(line) < 16 or any(c.isspace() for c in line):
                raise UsageError(
                    f"--api-key-file: {path}:{n}: a key needs at least 16 characters and no spaces"
                )
            else:
                keys.append(line)
        if not keys and not hashes:
            raise UsageError(f"--api-key-file: {path} holds no key")
        return cls(keys, hashes)

    def check(self, key: str | None) -> bool:
        if not key:
            return False
        digest = hash_key(key).encode()
        ok = False
        for stored in self._hashes:  # no early exit: the time does not say which key matched
            ok |= hmac.compare_digest(digest, stored.encode())
        return ok

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._hashes)} key(s))"


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _verdict(keys: ApiKeys, authorization: str | None) -> str | None:
    """None when allowed, else the message for the 401."""
    token = bearer_token(authorization)
    if token is None:
        return MISSING
    return None if keys.check(token) else WRONG


def require_key(keys: ApiKeys | None) -> Callable:
    """A FastAPI dependency: 401 in OpenAI's error format unless the request carries a valid key."""

    async def dependency(request: Request) -> None:
        if keys is None:
            return
        message = _verdict(keys, request.headers.get("authorization"))
        if message is not None:
            raise APIError(401, message, code="invalid_api_key", headers=_CHALLENGE)

    return dependency


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class KeyMiddleware:
    """ASGI middleware: every HTTP path but `open_paths` needs a valid key, checked before routing
    and before the body is read, so that an unauthenticated request has no side effect."""

    def __init__(self, app, keys: ApiKeys | None, open_paths: Iterable[str] = ("/health",)):
        self.app, self.keys, self.open_paths = app, keys, frozenset(open_paths)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.keys is None or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        raw = headers.get(b"authorization")
        message = _verdict(self.keys, raw.decode("latin-1") if raw is not None else None)
        if message is None:
            return await self.app(scope, receive, send)
        await send_json(send, 401, error_body(401, message, code="invalid_api_key"), _CHALLENGE)


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
    ]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": data})
