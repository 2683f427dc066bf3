"""`POST /v1/feedback` and `GET /dashboard`: the feedback router serve mounts behind its API keys.

Errors use OpenAI's error JSON naming the field; a down or locked database is a 503 (the client
retries with the same idempotency key), never a silent drop. The checks live in validate.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse

from tuneforge.errors import StoreUnavailable
from tuneforge.feedback import dashboard
from tuneforge.feedback.drift import DriftReference, drift_report, served_prompt
from tuneforge.feedback.stats import summarize
from tuneforge.feedback.store import FeedbackStore
from tuneforge.feedback.validate import FeedbackLimits, FieldError, parse_feedback
from tuneforge.serve.apierrors import error_response
from tuneforge.serve.auth import ApiKeys, require_key

RETRY_AFTER = {"Retry-After": "1"}
DEFAULT_LIMITS = FeedbackLimits()


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise FieldError(413, None, f"the request body is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise FieldError(413, None, f"the request body is over the limit of {limit} bytes")
    return bytes(body)


def _decode(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FieldError(400, None, f"the body is not valid UTF-8 (byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FieldError(400, None, f"the body is not JSON: {err.msg} at {err.pos}") from None


def _public(row: dict[str, Any], replay: bool) -> dict[str, Any]:
    keys = ("id", "response_id", "created", "rating", "scale", "score", "idempotency_key")
    return {"object": "feedback", **{k: row[k] for k in keys}, "idempotent_replay": replay}


def feedback_router(
    store: FeedbackStore,
    keys: ApiKeys | None,
    *,
    limits: FeedbackLimits = DEFAULT_LIMITS,
    training_texts: Sequence[str] | None = None,
    window_s: float = 7 * 86400,
) -> APIRouter:
    """The router; `training_texts` (the training prompts) switch on the dashboard's drift."""
    router = APIRouter(dependencies=[Depends(require_key(keys))])
    reference = DriftReference.from_texts(training_texts) if training_texts else None

    @router.post("/v1/feedback", status_code=201)
    async def post_feedback(request: Request) -> JSONResponse:
        try:
            body = _decode(await _read_body(request, limits.max_body_bytes))
            item = parse_feedback(body, limits, request.headers.get("idempotency-key"))
            row, created = await run_in_threadpool(store.add_feedback, item)
        except FieldError as err:
            return error_response(err.status, err.message, param=err.field)
        except StoreUnavailable:
            message = "the feedback store is unavailable; retry with the same idempotency key"
            return error_response(503, message, code="store_unavailable", headers=RETRY_AFTER)
        return JSONResponse(_public(row, not created), status_code=201 if created else 200)

    def _page() -> str:
        since = time.time() - window_s
        responses, feedback = store.responses(since), store.feedback(since)
        summary = summarize(responses, feedback)
        drift = None
        if reference is not None:
            drift = drift_report(reference, [served_prompt(r) for r in responses])
        return dashboard.render(summary, drift, feedback)

    @router.get("/dashboard", response_class=HTMLResponse)
    async def get_dashboard() -> HTMLResponse:
        try:
            page = await run_in_threadpool(_page)
        except StoreUnavailable:
            return error_response(503, "the feedback store is unavailable", headers=RETRY_AFTER)
        return HTMLResponse(page, headers={"Content-Security-Policy": dashboard.CSP})

    return router
