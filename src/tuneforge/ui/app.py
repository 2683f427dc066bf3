"""The web page's FastAPI app: pages, the job supervisor, static assets, the access guard.

Each group of pages is a router in its own module (`pages_*.py`); this module wires them to one
workspace, one job queue and one access token. Templates autoescape every value.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

import tuneforge.methods  # noqa: F401  (registers every method's options with the config)
from tuneforge.errors import TuneforgeError, UnsafePathError
from tuneforge.ui import pages_extra, pages_new, pages_runs
from tuneforge.ui.jobs import JobQueue
from tuneforge.ui.security import Guard, Keys
from tuneforge.ui.web import HERE, templates
from tuneforge.ui.workspace import Workspace


def create_app(
    workspace: str | Path, token: str, *, max_running: int = 1, supervise: bool = True
) -> FastAPI:
    """The page for one workspace. `supervise=False` leaves starting jobs to explicit ticks."""
    ws = Workspace(workspace)
    queue = JobQueue(ws, max_running=max_running)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(queue.supervise()) if supervise else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(
        title="tuneforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.ws, app.state.queue = ws, queue
    app.state.keys, app.state.templates = Keys(token), templates()
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    for module in (pages_new, pages_runs, pages_extra):
        app.include_router(module.router)

    @app.exception_handler(UnsafePathError)
    async def refused(request: Request, err: UnsafePathError) -> JSONResponse:
        return JSONResponse({"error": f"refused: {err}"}, status_code=400)

    @app.exception_handler(TuneforgeError)
    async def user_error(request: Request, err: TuneforgeError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=400)

    app.add_middleware(Guard, keys=app.state.keys)
    return app
