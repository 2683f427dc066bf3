"""What a run directory says about itself: progress, speed, ETA, warnings, final numbers.

Read from the files the trainer writes (manifest.json, metrics.jsonl, summary.json); only the
tail of metrics.jsonl is read for the run list, so the page stays fast on long runs. Whether a
run's process is alive is the job queue's business (`jobs.py`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TAIL_BYTES = 64 * 1024


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def parse_lines(text: str) -> list[dict[str, Any]]:
    """Complete JSON lines; a torn last line (being written) or a garbled one is skipped."""
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return parse_lines(path.read_text(encoding="utf-8", errors="replace"))


def tail_metrics(run: Path, nbytes: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The records in the last `nbytes` of metrics.jsonl (the first, partial line dropped)."""
    path = run / "metrics.jsonl"
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - nbytes))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    if size > nbytes:
        data = data.split("\n", 1)[-1]
    return parse_lines(data)


@dataclass
class RunInfo:
    """One run as the list and the run page show it; `state` is filled in by the job queue."""

    rel: str
    state: str = "unknown"
    step: int = 0
    total_steps: int | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    method: str | None = None
    model: str | None = None
    finished: bool = False
    has_report: bool = False
    checkpoints: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def progress(self) -> float | None:
        if self.finished:
            return 1.0
        if not self.total_steps:
            return None
        return min(1.0, self.step / self.total_steps)


def run_info(run: Path, rel: str, config_file: Path | None = None) -> RunInfo:
    """`config_file`: the job's config, read while the run has not written its own yet."""
    info = RunInfo(rel=rel)
    summary, manifest = read_json(run / "summary.json"), read_json(run / "manifest.json")
    info.summary, info.finished = summary, bool(summary)
    info.total_steps = summary.get("total_steps") or manifest.get("total_steps")
    info.has_report = (run / "report.html").is_file()
    ckpt = run / "checkpoints"
    info.checkpoints = sorted(p.name for p in ckpt.glob("step-*")) if ckpt.is_dir() else []
    config = _read_config(run / "config.yaml")
    if not config and config_file is not None:
        config = _read_config(config_file)
    info.method = (config.get("method") or {}).get("name")
    info.model = (config.get("model") or {}).get("name")
    records = tail_metrics(run)
    _fill_progress(info, records)
    info.warnings = [r["warning"] for r in records if isinstance(r.get("warning"), str)]
    if summary:
        info.step = summary.get("steps", info.step)
        info.tokens_per_s = summary.get("tokens_per_s", info.tokens_per_s)
        info.eval_loss = (summary.get("eval") or {}).get("eval_loss", info.eval_loss)
        info.eta_s = 0.0
    return info


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _fill_progress(info: RunInfo, records: list[dict[str, Any]]) -> None:
    train = [r for r in records if isinstance(r.get("loss"), int | float) and "step" in r]
    evals = [r for r in records if isinstance(r.get("eval_loss"), int | float)]
    if evals:
        info.eval_loss = evals[-1]["eval_loss"]
    if not train:
        return
    last = train[-1]
    info.step, info.loss = int(last["step"]), float(last["loss"])
    info.tokens_per_s = last.get("tokens_per_s")
    info.eta_s = eta_seconds(train, info.total_steps)


def eta_seconds(train: list[dict[str, Any]], total_steps: int | None) -> float | None:
    """Seconds per step over the latest stretch of one process (elapsed_s restarts on resume)."""
    if not total_steps or len(train) < 2:
        return None
    last, first = train[-1], train[-1]
    for record in reversed(train[:-1]):
        if (
            record.get("elapsed_s", 0) > first.get("elapsed_s", 0)
            or record["step"] >= first["step"]
        ):
            break
        first = record
    steps = last["step"] - first["step"]
    if steps <= 0:
        return None
    per_step = (last["elapsed_s"] - first["elapsed_s"]) / steps
    return max(0.0, per_step * (total_steps - last["step"]))


def curves(records: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """Every numeric series by name as [step, value] pairs: loss, lr, eval_*, tokens_per_s ..."""
    out: dict[str, list[list[float]]] = {}
    for r in records:
        step = r.get("step")
        if not isinstance(step, int | float):
            continue
        for key, value in r.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                out.setdefault(key, []).append([step, value])
    return out


def final_metrics(info: RunInfo) -> dict[str, Any]:
    """The compare table's row: summary numbers and every final eval metric."""
    s = info.summary
    row = {
        "method": info.method,
        "steps": s.get("steps", info.step),
        "train_loss": s.get("train_loss"),
        "final_train_loss": s.get("final_train_loss", info.loss),
        "tokens_per_s": s.get("tokens_per_s", info.tokens_per_s),
        "train_runtime_s": s.get("train_runtime_s"),
        "peak_memory_mb": s.get("peak_memory_mb"),
        "trainable_params": s.get("trainable_params"),
    }
    for key, value in (s.get("eval") or {}).items():
        if isinstance(value, int | float):
            row[key] = value
    if "eval_loss" not in row and info.eval_loss is not None:
        row["eval_loss"] = info.eval_loss
    return row
