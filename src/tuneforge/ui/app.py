"""The web page's FastAPI app: pages, the job supervisor, static assets, the access guard.

Each group of pages is a router in its own module (`pages_*.py`); this module wires them to one
workspace, one job queue and one access token. Templates autoescape every value.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

import tuneforge.methods  # noqa: F401  (registers every method's options with the config)
from tuneforge.errors import TuneforgeError, UnsafePathError
from tuneforge.ui import pages_chat, pages_extra, pages_new, pages_runs
from tuneforge.ui.chat import SERVE_ARGV, ChatServer, ChatUnavailable
from tuneforge.ui.jobs import JobQueue
from tuneforge.ui.security import Guard, Keys
from tuneforge.ui.web import HERE, templates
from tuneforge.ui.workspace import Workspace


def create_app(
    workspace: str | Path,
    token: str,
    *,
    max_running: int = 1,
    supervise: bool = True,
    serve_argv: Sequence[str] = SERVE_ARGV,
) -> FastAPI:
    """The page for one workspace. `supervise=False` leaves starting jobs to explicit ticks;
    `serve_argv` is the command the chat server runs (`tuneforge serve`), its arguments added."""
    ws = Workspace(workspace)
    queue = JobQueue(ws, max_running=max_running)
    chat = ChatServer(ws, serve_argv)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        chat.reap_stale()
        task = asyncio.create_task(queue.supervise()) if supervise else None
        try:
            yield
        finally:
            await chat.stop()
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(
        title="tuneforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.ws, app.state.queue, app.state.chat = ws, queue, chat
    app.state.keys, app.state.templates = Keys(token), templates()
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    for module in (pages_new, pages_runs, pages_extra, pages_chat):
        app.include_router(module.router)

    @app.exception_handler(UnsafePathError)
    async def refused(request: Request, err: UnsafePathError) -> JSONResponse:
        return JSONResponse({"error": f"refused: {err}"}, status_code=400)

    @app.exception_handler(ChatUnavailable)
    async def chat_down(request: Request, err: ChatUnavailable) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=502)

    @app.exception_handler(TuneforgeError)
    async def user_error(request: Request, err: TuneforgeError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=400)

    app.add_middleware(Guard, keys=app.state.keys)
    return app
