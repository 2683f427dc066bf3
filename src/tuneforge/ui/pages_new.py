"""Pages that make a run: the generated config form (validate, save as YAML, launch), the data
check, and the workspace file picker.

Form <-> config is `forms.py`'s; the job is the queue's; checking data is `datacheck.py`'s.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from tuneforge.config import RunConfig, build_config, method_names
from tuneforge.errors import TuneforgeError, UnsafePathError
from tuneforge.paths import write_text_atomic
from tuneforge.ui import forms
from tuneforge.ui.web import form_data, render
from tuneforge.ui.workspace import Workspace

router = APIRouter()
CONFIG_DIR = "configs"
CONFIG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")


def builtin_models() -> list[str]:
    from tuneforge.models import BUILTIN_MODELS

    return sorted(BUILTIN_MODELS)


def check_paths(result: forms.FormResult, ws: Workspace, queue) -> None:
    """Every path in the config must lie in the workspace; the data must exist; the run dir must
    be free. Errors go beside their keys, worded like the CLI's."""
    cfg = result.config
    if cfg is None:
        return
    specs = forms.all_fields()
    named = {
        "data.train": cfg.data.train,
        "data.validation": cfg.data.validation if isinstance(cfg.data.validation, str) else None,
        "output.dir": cfg.output.dir,
    }
    if cfg.model.name not in builtin_models():
        named["model.name"] = cfg.model.name
    for key, value in named.items():
        if value is None:
            continue
        try:
            path = ws.resolve(value)
        except UnsafePathError as err:
            result.add_error(f"{key}: refused: {err}", specs)
            continue
        problem = _path_problem(key, value, path, cfg, ws, queue)
        if problem:
            result.add_error(f"{key}: {problem}", specs)


def _path_problem(key: str, value: str, path: Path, cfg: RunConfig, ws: Workspace, queue) -> str:
    if key in ("data.train", "data.validation") and not path.is_file():
        return f"{value}: no such file in the workspace"
    if key == "model.name" and not (path.is_dir() or path.suffix == ".gguf" and path.is_file()):
        names = ", ".join(builtin_models())
        return f"{value!r} is neither a built-in model ({names}) nor a model in the workspace"
    if key == "output.dir":
        if path == ws.root:
            return "the run directory cannot be the workspace itself"
        job = queue.latest(ws.rel(path))
        if job is not None and job.active:
            return f"{value} is the directory of a {job.state} run; choose another"
        if path.exists() and any(path.iterdir()) and not cfg.output.overwrite:
            return (
                f"{value} is not empty; choose another output.dir, set output.overwrite=true, "
                "or resume that run from its page"
            )
    return ""


def absolute_config(cfg: RunConfig, ws: Workspace) -> RunConfig:
    """The config with its workspace paths made absolute, for work done in the page's process."""
    data = {"train": str(ws.resolve(cfg.data.train))}
    if isinstance(cfg.data.validation, str):
        data["validation"] = str(ws.resolve(cfg.data.validation))
    update: dict[str, Any] = {"data": cfg.data.model_copy(update=data)}
    if cfg.model.name not in builtin_models():
        update["model"] = cfg.model.model_copy(update={"name": str(ws.resolve(cfg.model.name))})
    return cfg.model_copy(update=update)


def _form_page(request: Request, result: forms.FormResult | None = None, **extra: Any):
    ws: Workspace = request.app.state.ws
    values = result.values if result else extra.pop("values", {})
    return render(
        request,
        "new.html",
        status=extra.pop("status", 200),
        sections=forms.sections(),
        methods=method_names(),
        method=values.get("method.name", "lora"),
        values=values,
        errors=result.errors if result else {},
        general=result.general if result else [],
        models=builtin_models() + ws.model_dirs(),
        data_files=ws.data_files(),
        config_name=extra.pop("config_name", ""),
        **{"saved": None, "yaml_text": None, **extra},
    )


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/runs", status_code=303)


@router.get("/new")
def new_run(request: Request, config: str = ""):
    """The form, with defaults or with the values of a workspace config file (?config=...)."""
    values: dict[str, str] = {}
    if config:
        raw = yaml.safe_load(request.app.state.ws.resolve(config).read_text(encoding="utf-8"))
        values = forms.values_from_config(raw if isinstance(raw, dict) else {})
    return _form_page(request, values=values, config_name=Path(config).stem if config else "")


@router.post("/new")
async def submit_run(request: Request):
    form = await form_data(request)
    ws, queue = request.app.state.ws, request.app.state.queue
    result = forms.validate(forms.read_form(form))
    check_paths(result, ws, queue)
    name = form.get("config_name", "").strip() or _default_name(result)
    if not CONFIG_NAME.match(name):
        result.general.append(f"config name {name!r}: use letters, digits, '.', '_' or '-'")
    if not result.ok:
        return _form_page(request, result, status=422, config_name=name)
    text = forms.to_yaml(result.raw)
    action = form.get("action", "validate")
    if action == "yaml":
        headers = {"content-disposition": f'attachment; filename="{name}.yaml"'}
        return Response(text, media_type="application/x-yaml", headers=headers)
    if action == "validate":
        return _form_page(request, result, config_name=name, yaml_text=text)
    rel = f"{CONFIG_DIR}/{name}.yaml"
    write_text_atomic(ws.resolve(rel), text)
    if action == "check":
        return RedirectResponse(f"/data?config={rel}", status_code=303)
    if action == "launch":
        run = ws.rel(ws.resolve(result.config.output.dir))
        queue.submit("train", run, ["train", rel, "--quiet"])
        return RedirectResponse(f"/run?dir={run}", status_code=303)
    return _form_page(request, result, config_name=name, yaml_text=text, saved=rel)


def _default_name(result: forms.FormResult) -> str:
    if result.config is None:
        return "run"
    return Path(result.config.output.dir).name or "run"


@router.get("/data")
async def data_page(request: Request, config: str = ""):
    """`data check` for a workspace config file: counts, bad rows, lengths, one example."""
    ws: Workspace = request.app.state.ws
    configs = _config_files(ws)
    context: dict[str, Any] = {"configs": configs, "config": config, "check": None, "error": None}
    if config:
        try:
            raw = yaml.safe_load(ws.resolve(config).read_text(encoding="utf-8")) or {}
            cfg = absolute_config(build_config(raw), ws)
            shorten = lambda p: _shorten(p, ws)  # noqa: E731
            from tuneforge.ui.datacheck import check_data

            context["check"] = await asyncio.to_thread(check_data, cfg, shorten)
        except (TuneforgeError, FileNotFoundError, yaml.YAMLError) as err:
            context["error"] = _shorten(str(err), ws)
    return render(request, "data.html", **context)


def _config_files(ws: Workspace) -> list[str]:
    folder = ws.root / CONFIG_DIR
    return (
        sorted(f"{CONFIG_DIR}/{p.name}" for p in folder.glob("*.yaml")) if folder.is_dir() else []
    )


def _shorten(text: str, ws: Workspace) -> str:
    return str(text).replace(str(ws.root) + "/", "")


@router.get("/api/files")
def list_files(request: Request, dir: str = "") -> JSONResponse:
    """The picker: one workspace directory's entries (refused outside the workspace)."""
    entries = request.app.state.ws.listdir(dir)
    return JSONResponse(
        {
            "dir": dir,
            "entries": [
                {"name": e.name, "path": e.path, "dir": e.is_dir, "size": e.size} for e in entries
            ],
        }
    )
