"""The export page: a `tuneforge export` job for a finished run, and each export's re-check table.

The export itself and its re-check are the export recipe's; this reads the export.json it leaves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse

from tuneforge.errors import RunDirError, UsageError
from tuneforge.ui.runs import read_json
from tuneforge.ui.web import form_data, render

router = APIRouter()
EXPORT_FORMATS = {"merged": None, "gguf": "q4_k_m", "nf4": None}
QUANTS = ("q4_k_m", "q8_0", "q5_k_m", "q6_k", "q4_0", "f16")
METRICS = ("loss", "perplexity", "accuracy", "macro_f1")


def finished_runs(request: Request) -> list[str]:
    ws = request.app.state.ws
    return [rel for rel in ws.run_dirs() if (ws.root / rel / "summary.json").is_file()]


def export_reports(run: Path, rel: str) -> list[dict[str, Any]]:
    """Every export of a run (RUN/export-*/export.json) as table rows for the page."""
    out = []
    for path in sorted(run.glob("export-*/export.json")):
        report = read_json(path)
        artefacts = report.get("artefacts") or []
        metrics = [m for m in METRICS if any(m in (a.get("metrics") or {}) for a in artefacts)]
        out.append(
            {
                "dir": f"{rel}/{path.parent.name}",
                "format": report.get("format", "?"),
                "data": report.get("data"),
                "examples": report.get("examples"),
                "passed": report.get("passed"),
                "metrics": metrics,
                "artefacts": artefacts,
            }
        )
    return out


@router.get("/export")
def export_page(request: Request, dir: str = ""):
    runs = finished_runs(request)
    context: dict[str, Any] = {"runs": runs, "dir": dir, "reports": [], "job": None, "log": ""}
    if dir:
        queue = request.app.state.queue
        run = request.app.state.ws.resolve(dir)
        if not (run / "summary.json").is_file():
            raise RunDirError(f"{dir}: not a finished run of this workspace")
        context["reports"] = export_reports(run, dir)
        context["job"] = queue.latest(dir, "export")
        context["log"] = queue.log_tail(context["job"]) if context["job"] else ""
    return render(
        request,
        "export.html",
        formats=list(EXPORT_FORMATS),
        quants=QUANTS,
        **context,
    )


@router.post("/export")
async def export_start(request: Request) -> RedirectResponse:
    """Queue `tuneforge export RUN --format F [--quant Q] --overwrite` for a finished run."""
    form = await form_data(request)
    rel, fmt = form.get("dir", ""), form.get("format", "")
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"format: {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if not (request.app.state.ws.resolve(rel) / "summary.json").is_file():
        raise RunDirError(f"{rel}: not a finished run of this workspace")
    argv = ["export", rel, "--format", fmt, "--overwrite"]
    if fmt == "gguf":
        quant = form.get("quant", "q4_k_m")
        if quant not in QUANTS:
            raise UsageError(f"quant: {quant!r} is not one of {', '.join(QUANTS)}")
        argv += ["--quant", quant]
    request.app.state.queue.submit("export", rel, argv)
    return RedirectResponse(f"/export?dir={rel}", status_code=303)
