"""Limits a request must fit: body size (413), token budget against the context and the cap (400),
the per-request timeout; the bounded queue itself is the engine's (429 comes from QueueFull).

Each refusal is OpenAI error JSON naming the field at fault; app.py applies these.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.serve.apierrors import APIError, error_body
from tuneforge.serve.auth import send_json


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20  # 1 MiB: far more than any prompt the context can hold
    max_tokens_cap: int = 2048  # max_tokens above this is refused (400)
    request_timeout_s: float = 300.0  # queue wait + generation; then the job is cancelled (503)
    retry_after_s: int = 1  # what 429 / 503 tell the client to wait
    shutdown_grace_s: float = 30.0  # in-flight requests get this long after SIGTERM


def token_budget(
    prompt_tokens: int, asked: int | None, field: str, prompt_field: str, context: int, cap: int
) -> int:
    """max_tokens for the engine: what was asked, or what fits; 400 when it cannot fit."""
    if asked is not None and asked > cap:
        raise APIError(
            400,
            f"{field}: {asked} is more than this server allows ({cap})",
            param=field,
            code="max_tokens_over_cap",
        )
    room = context - prompt_tokens
    if room < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens, and the prompt alone "
            f"has {prompt_tokens}. Shorten the {prompt_field}.",
            param=prompt_field,
            code="context_length_exceeded",
        )
    if asked is None:
        return min(cap, room)
    if asked > room:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + asked} tokens ({prompt_tokens} in the {prompt_field}, {asked} in the "
            f"completion). Shorten the {prompt_field} or lower {field}.",
            param=field,
            code="context_length_exceeded",
        )
    return asked


class BodyLimitMiddleware:
    """ASGI middleware: a request body over `max_bytes` gets 413 before the app sees any of it.

    A declared Content-Length is checked first; a chunked body is read up to the limit and
    replayed to the app, so memory stays bounded either way.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                return await _refuse(send, 400, "Content-Length is not a number")
            if too_big:
                return await _too_large(send, self.max_bytes)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _too_large(send, self.max_bytes)
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later reads see the client's disconnect

    return replay


async def _too_large(send, limit: int) -> None:
    await _refuse(
        send, 413, f"The request body is larger than this server's limit ({limit} bytes)."
    )


async def _refuse(send, status: int, message: str) -> None:
    await send_json(send, status, error_body(status, message, code="request_too_large"))
