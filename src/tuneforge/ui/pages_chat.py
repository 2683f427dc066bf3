"""Chat and feedback pages: the browser talks to the page, the page to its `tuneforge serve`.

The page adds the server's API key to each call (the browser never sees it) and relays the
streamed answer as it comes; the server and its store are chat.py's and the feedback package's.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from tuneforge.errors import UsageError
from tuneforge.ui.chat import ChatUnavailable, Served, chat_targets, check_target, store_path
from tuneforge.ui.web import render

router = APIRouter()
MAX_MESSAGES = 200
ROLES = ("system", "user", "assistant")
DASHBOARD_WINDOW_S = 7 * 86400  # what the served /dashboard shows


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise UsageError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise UsageError("the request body must be a JSON object")
    return body


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise UsageError(f"{name}: {value!r} is not a number between {low:g} and {high:g}")
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MESSAGES:
        raise UsageError(f"messages: expected a list of 1 to {MAX_MESSAGES} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise UsageError(f"messages[{i}].role: expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise UsageError(f"messages[{i}].content: expected a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def upstream_error(status: int, data: bytes) -> JSONResponse:
    """The server's own error message (OpenAI's error JSON) as the page's {"error": ...}."""
    try:
        message = json.loads(data)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = data.decode("utf-8", "replace")[:500] or f"HTTP {status}"
    return JSONResponse({"error": message, "status": status}, status_code=status)


async def served_for(request: Request, target: str) -> Served:
    rel = check_target(request.app.state.ws, target)
    try:
        return await request.app.state.chat.ensure(rel)
    except ChatUnavailable as err:
        raise ChatUnavailable(f"{err}\n{request.app.state.chat.log_tail()}") from None


@router.get("/chat")
def chat_page(request: Request, target: str = ""):
    ws, chat = request.app.state.ws, request.app.state.chat
    status = chat.status()
    target = check_target(ws, target) if target else str(status["target"])
    return render(request, "chat.html", targets=chat_targets(ws), target=target, server=status)


@router.get("/chat/status")
def chat_status(request: Request) -> dict[str, object]:
    return request.app.state.chat.status()


@router.post("/chat/start")
async def chat_start(request: Request) -> JSONResponse:
    body = await json_body(request)
    served = await served_for(request, str(body.get("target", "")))
    return JSONResponse({"state": "ready", "target": served.target, "model": served.model})


@router.post("/chat/stop")
async def chat_stop(request: Request) -> dict[str, object]:
    await request.app.state.chat.stop()
    return request.app.state.chat.status()


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    """Relay `POST /v1/chat/completions` (stream: true) and its SSE chunks as they arrive."""
    body = await json_body(request)
    upstream = {
        "messages": _messages(body.get("messages")),
        "max_tokens": int(_number(body, "max_tokens", 256, 1, 4096)),
        "temperature": _number(body, "temperature", 0.7, 0.0, 2.0),
        "stream": True,
    }
    served = await served_for(request, str(body.get("target", "")))
    upstream["model"] = served.model
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
    call = client.build_request(
        "POST", served.url + "/v1/chat/completions", json=upstream, headers=served.auth
    )
    try:
        response = await client.send(call, stream=True)
    except httpx.TransportError as err:
        await client.aclose()
        raise ChatUnavailable(f"the chat server did not answer: {err}") from None
    if response.status_code != 200:
        data = await response.aread()
        await response.aclose()
        await client.aclose()
        return upstream_error(response.status_code, data)

    async def relay():
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        finally:  # the browser went away: closing the upstream stream cancels the generation
            await response.aclose()
            await client.aclose()

    return StreamingResponse(
        relay(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"}
    )


@router.post("/chat/feedback")
async def chat_feedback(request: Request) -> JSONResponse:
    """Relay a rating to the server's `/v1/feedback`; its answer (or its 4xx message) comes back."""
    body = await json_body(request)
    rating = {k: body.get(k) for k in ("response_id", "rating", "idempotency_key")}
    rating["scale"] = "thumbs"  # the page's only scale: -1 or +1
    correction = body.get("correction")
    rating["correction"] = (
        correction if isinstance(correction, str) and correction.strip() else None
    )
    served = await served_for(request, str(body.get("target", "")))
    async with httpx.AsyncClient(timeout=30.0) as client:
        try:
            response = await client.post(
                served.url + "/v1/feedback", json=rating, headers=served.auth
            )
        except httpx.TransportError as err:
            raise ChatUnavailable(f"the chat server did not answer: {err}") from None
    if response.status_code >= 300:
        return upstream_error(response.status_code, response.content)
    return JSONResponse(response.json(), status_code=response.status_code)


def feedback_targets(request: Request) -> list[str]:
    ws = request.app.state.ws
    return [t for t in chat_targets(ws) if store_path(ws, t).is_file()]


@router.get("/feedback")
def feedback_page(request: Request, target: str = ""):
    targets = feedback_targets(request)
    if target:
        target = check_target(request.app.state.ws, target)
    elif targets:
        target = targets[0]
    return render(request, "feedback.html", targets=targets, target=target)


def dashboard_html(url: str) -> str:
    """The served `/dashboard`, rendered here from the same store by the feedback package."""
    from tuneforge.feedback import FeedbackStore
    from tuneforge.feedback import dashboard as feedback_dashboard
    from tuneforge.feedback.stats import summarize

    store = FeedbackStore(url, create=False)
    try:
        since = time.time() - DASHBOARD_WINDOW_S
        feedback = store.feedback(since)
        summary = summarize(store.responses(since), feedback)
    finally:
        store.close()
    return feedback_dashboard.render(summary, None, feedback)


@router.get("/feedback/dashboard")
async def feedback_dashboard(request: Request, target: str) -> HTMLResponse:
    ws = request.app.state.ws
    path = store_path(ws, check_target(ws, target))
    if not path.is_file():
        raise UsageError(f"{target}: no feedback store yet; chat with it first")
    from tuneforge.feedback.dashboard import CSP

    html = await run_in_threadpool(dashboard_html, f"sqlite:///{path}")
    return HTMLResponse(html, headers={"Content-Security-Policy": CSP})
