"""The tasks of a meta-train run: rows grouped by a field of data.train, or one file per task,
tokenised under the run's data policies and checked against the episode size.

Sampling episodes from them is train/meta.py's; this only reads and groups.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneforge.config import RunConfig
from tuneforge.data.formats import BadRow, read_records
from tuneforge.data.pipeline import TokenizedExample, prepare_data
from tuneforge.errors import ConfigError, DataError
from tuneforge.train.rundir import file_sha256


def load_tasks(
    cfg: RunConfig, tokenizer: Any
) -> tuple[dict[str, list[TokenizedExample]], dict[str, Any]]:
    """({task: tokenised rows}, {file: sha256}) for meta.tasks, every task big enough."""
    meta = cfg.meta
    if isinstance(meta.tasks, str):
        tasks = _by_field(cfg, tokenizer, meta.tasks)
        files = {cfg.data.train: file_sha256(cfg.data.train)}
    else:
        tasks, files = {}, {}
        for path in meta.tasks:
            name = Path(path).stem
            if name in tasks:
                raise ConfigError(f"meta.tasks: two files make the task {name!r}; rename one")
            tasks[name] = _prepare(cfg, tokenizer, path).train
            files[path] = file_sha256(path)
    _check(cfg, tasks)
    return dict(sorted(tasks.items())), files


def _prepare(cfg: RunConfig, tokenizer: Any, path: str):
    d = cfg.data
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    return prepare_data(
        path,
        None,
        tokenizer,
        fmt=d.format,
        max_length=d.max_length,
        truncation=d.truncation,
        on_bad_row=d.on_bad_row,
        train_on=d.train_on,
        seed=cfg.train.seed,
    )


def _by_field(cfg: RunConfig, tokenizer: Any, field: str) -> dict[str, list[TokenizedExample]]:
    path = cfg.data.train
    prepared = _prepare(cfg, tokenizer, path)
    task_of: dict[int, str] = {}
    missing = []
    for line, record in read_records(path):
        if isinstance(record, BadRow):
            continue
        value = record.get(field)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
            task_of[line] = str(value)
        else:
            missing.append(BadRow(str(path), line, f"no task name in field '{field}'"))
    if missing:
        lines = "\n".join(f"  {row}" for row in missing[:10])
        raise DataError(f"meta.tasks: {len(missing)} rows of {path} name no task:\n{lines}")
    tasks: dict[str, list[TokenizedExample]] = {}
    for ex in prepared.train:
        line = int(ex.source.rpartition(":")[2])
        tasks.setdefault(task_of[line], []).append(ex)
    return tasks


def _check(cfg: RunConfig, tasks: dict[str, list[TokenizedExample]]) -> None:
    meta = cfg.meta
    unknown = [t for t in meta.held_out if t not in tasks]
    if unknown:
        raise ConfigError(
            f"meta.held_out: no task {unknown[0]!r}; tasks are {', '.join(sorted(tasks))}"
        )
    if len(tasks) - len(set(meta.held_out)) < 1:
        raise ConfigError("meta.held_out: every task is held out; none is left to meta-train on")
    need = meta.shots + meta.query_shots
    for name, rows in tasks.items():
        if len(rows) < need:
            raise ConfigError(
                f"meta.shots: task {name!r} has {len(rows)} usable rows; an episode needs "
                f"shots + query_shots = {need}"
            )
