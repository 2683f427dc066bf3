"""Pages that watch runs: the list, a run's live page (SSE curves, warnings, cancel / resume,
report, log) and the side-by-side comparison.

What a run dir says is `runs.py`'s; the live tail is `tail.py`'s; jobs are `jobs.py`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    StreamingResponse,
)

from tuneforge.config import build_config
from tuneforge.errors import RunDirError, UnsafePathError
from tuneforge.ui.runs import RunInfo, curves, final_metrics, read_json, read_metrics, run_info
from tuneforge.ui.tail import follow
from tuneforge.ui.web import form_data, render

router = APIRouter()


def run_path(request: Request, rel: str) -> Path:
    path = request.app.state.ws.resolve(rel)
    known = request.app.state.queue.latest(rel) is not None
    if not known and not (path / "config.yaml").is_file():
        raise RunDirError(f"{rel}: not a run directory of this workspace")
    return path


def describe(request: Request, rel: str) -> RunInfo:
    """The run as its files say, with the state of its latest job (or, without one, its files)."""
    job = request.app.state.queue.latest(rel, "train")
    ws = request.app.state.ws
    config = ws.resolve(job.argv[1]) if job is not None and len(job.argv) > 1 else None
    info = run_info(run_path(request, rel), rel, config)
    if job is not None:
        info.state = job.state
    else:
        info.state = (
            "finished" if info.finished else "stopped" if info.checkpoints else "incomplete"
        )
    return info


def all_runs(request: Request) -> list[RunInfo]:
    ws, queue = request.app.state.ws, request.app.state.queue
    rels = [job.run for job in reversed(queue.jobs) if job.kind == "train"]
    rels += sorted(ws.run_dirs(), key=lambda r: -(ws.root / r).stat().st_mtime)
    return [describe(request, rel) for rel in dict.fromkeys(rels)]


@router.get("/runs")
def runs_page(request: Request):
    return render(request, "runs.html", runs=all_runs(request))


@router.get("/run")
def run_page(request: Request, dir: str):
    info = describe(request, dir)
    job = request.app.state.queue.latest(dir, "train")
    log = request.app.state.queue.log_tail(job) if job else ""
    resumable = (
        bool(info.checkpoints) and not info.finished and info.state not in ("queued", "running")
    )
    return render(request, "run.html", run=info, job=job, log=log, resumable=resumable)


@router.get("/run/events")
async def run_events(request: Request, dir: str, offset: int = 0) -> StreamingResponse:
    """Server-sent events: the run's metrics lines as they are written, then its final state."""
    path = run_path(request, dir)
    queue = request.app.state.queue
    last_id = request.headers.get("last-event-id")
    if last_id and last_id.isdigit():
        offset = int(last_id)

    def status() -> dict[str, Any]:
        job = queue.latest(dir, "train")
        finished = (path / "summary.json").is_file()
        state = job.state if job else "finished" if finished else "stopped"
        return {
            "state": state,
            "active": job is not None and job.active,
            "total_steps": read_json(path / "manifest.json").get("total_steps"),
            "has_report": (path / "report.html").is_file(),
        }

    stream = follow(path / "metrics.jsonl", offset, status, request.is_disconnected)
    headers = {"cache-control": "no-store", "x-accel-buffering": "no"}
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


@router.post("/run/cancel")
async def cancel(request: Request) -> RedirectResponse:
    rel = (await form_data(request)).get("dir", "")
    queue = request.app.state.queue
    job = queue.latest(rel, "train")
    if job is None or not job.active:
        raise RunDirError(f"{rel}: no queued or running job to cancel")
    queue.cancel(job)
    return RedirectResponse(f"/run?dir={rel}", status_code=303)


@router.post("/run/resume")
async def resume(request: Request) -> RedirectResponse:
    """Continue from the newest complete checkpoint (`train CONFIG --resume auto`)."""
    rel = (await form_data(request)).get("dir", "")
    ws, queue = request.app.state.ws, request.app.state.queue
    path = run_path(request, rel)
    job = queue.latest(rel, "train")
    config = job.argv[1] if job is not None else f"{rel}/config.yaml"
    raw = yaml.safe_load(ws.resolve(config).read_text(encoding="utf-8")) or {}
    if ws.resolve(build_config(raw).output.dir) != path:
        raise UnsafePathError(f"{config}: its output.dir is not {rel}")
    queue.submit("train", rel, ["train", config, "--quiet", "--resume", "auto"])
    return RedirectResponse(f"/run?dir={rel}", status_code=303)


@router.get("/run/report")
def report(request: Request, dir: str) -> FileResponse:
    path = run_path(request, dir) / "report.html"
    if not path.is_file():
        raise RunDirError(f"{dir}: no report.html (written at the end of a run with validation)")
    return FileResponse(path, media_type="text/html")


@router.get("/run/log")
def log(request: Request, dir: str) -> PlainTextResponse:
    queue = request.app.state.queue
    job = queue.latest(dir)
    return PlainTextResponse(queue.log_tail(job, 200_000) if job else "")


@router.get("/api/metrics")
def metrics(request: Request, dir: str) -> JSONResponse:
    return JSONResponse(curves(read_metrics(run_path(request, dir))))


@router.get("/compare")
def compare(request: Request):
    chosen = request.query_params.getlist("runs")
    runs = all_runs(request)
    picked = [describe(request, rel) for rel in chosen]
    rows = [(info.rel, final_metrics(info)) for info in picked]
    columns = list(dict.fromkeys(key for _, row in rows for key in row))
    return render(request, "compare.html", runs=runs, chosen=chosen, rows=rows, columns=columns)
