"""`create_app`: the FastAPI app serving engines in OpenAI's format, behind keys and limits, with
/health (open), /metrics, extra routers (feedback) and a `reload` hook for promoted weights.

Routes are routes.py's, request lifetimes calls.py's; running it under uvicorn is server.py's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneforge.serve.apierrors import APIError, api_error_response, error_response, field_path
from tuneforge.serve.auth import ApiKeys, KeyMiddleware, require_key
from tuneforge.serve.calls import Runner
from tuneforge.serve.engines.base import Engine
from tuneforge.serve.limits import BodyLimitMiddleware, Limits
from tuneforge.serve.metrics import MetricsMiddleware, ServeMetrics
from tuneforge.serve.records import RecordSink
from tuneforge.serve.routes import (
    CHAT,
    COMPLETIONS,
    GENERATION_ROUTES,
    MODELS,
    ModelTable,
    error_record,
    openai_router,
)

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health",)


def create_app(
    engines: Engine | Sequence[Engine],
    *,
    keys: ApiKeys | None,
    sink: RecordSink,
    routers: Sequence[APIRouter] = (),
    limits: Limits | None = None,
) -> FastAPI:
    """The app; engines start now (so in-process test clients work) and stop at app shutdown.

    `app.state.reload(name_or_path, name=None) -> str` swaps in new weights without downtime
    (blocking: call it from a thread); see TransformersEngine.reload.
    """
    engines = list(engines) if isinstance(engines, Sequence) else [engines]
    limits = limits or Limits()
    extra_paths = [route.path for router in routers for route in router.routes]
    metrics = ServeMetrics([CHAT, COMPLETIONS, MODELS, "/health", "/metrics", *extra_paths])
    for engine in engines:
        engine.on_batch = metrics.batch_size.observe
        engine.start()
    metrics.watch_queue(lambda: sum(engine.queue_depth() for engine in engines))
    runner = Runner(sink, limits, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for engine in engines:  # uvicorn has already let in-flight requests finish
            await anyio.to_thread.run_sync(engine.shutdown, limits.shutdown_grace_s)

    app = FastAPI(
        title="tuneforge",
        summary="OpenAI-compatible API for tuneforge runs and exports",
        lifespan=lifespan,
    )
    app.include_router(openai_router(ModelTable(engines), runner, limits))
    for router in routers:
        app.include_router(router, dependencies=[Depends(require_key(keys))])

    @app.get("/health", summary="Liveness (no key needed)")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    _install_error_handlers(app, runner)
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    app.add_middleware(KeyMiddleware, keys=keys, open_paths=OPEN_PATHS)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: sees 401s and 413s too
    app.state.engines, app.state.sink, app.state.limits = engines, sink, limits
    app.state.metrics, app.state.keys = metrics, keys
    app.state.reload = _reload_hook(engines)
    return app


def _reload_hook(engines: list[Engine]):
    def reload(name_or_path: str | Path, name: str | None = None) -> str:
        """Swap in new weights for a served name (or add a model); returns the served name."""
        for engine in engines:
            served = engine.model_names()
            if str(name_or_path) in served or (name is not None and name in served):
                return engine.reload(name_or_path, name)
        return engines[0].reload(name_or_path, name)

    return reload


def _install_error_handlers(app: FastAPI, runner: Runner) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc, APIError):
            return api_error_response(exc)
        message = {
            404: f"Unknown path: {request.method} {request.url.path}",
            405: f"Method {request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = list(exc.errors())
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            param, message = None, "The request body is not valid JSON."
        else:
            param = field_path(first.get("loc", ()))
            message = "; ".join(
                f"{field_path(e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}"
                for e in errors[:5]
            )
        if request.url.path in GENERATION_ROUTES:
            started = time.perf_counter()
            await runner.write(error_record(request.url.path, exc.body, started, 400, message))
        return error_response(400, message, param, code="invalid_request")

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "The server had an error while processing the request.")
