"""K-fold cross-validation (`tuneforge cv`): seeded disjoint folds of data.train, one training
run per fold under OUTPUT_DIR/fold-K, and the mean ± std of every final metric (cv.json).

Like recipe.py this reads the whole config; each fold is an ordinary run of the training recipe.
"""

from __future__ import annotations

import logging
import random
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tuneforge.config import RunConfig, build_config
from tuneforge.data.formats import Example, load_examples, write_examples_jsonl
from tuneforge.errors import ConfigError, RunDirError
from tuneforge.models import resolve_model_dir
from tuneforge.paths import write_json_atomic

log = logging.getLogger("tuneforge")
CV_FILE = "cv.json"
# Summary keys averaged across folds besides summary["eval"].
TRAIN_KEYS = ("train_loss", "final_train_loss")


def fold_indices(n: int, k: int, seed: int) -> list[list[int]]:
    """K disjoint folds that together hold every index of range(n) once; sizes differ by <= 1."""
    if k < 2:
        raise ValueError(f"--folds: cross-validation needs at least 2 folds, got {k}")
    if n < k:
        raise ValueError(f"--folds: {n} usable rows cannot make {k} non-empty folds")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [sorted(order[i::k]) for i in range(k)]


def write_folds(
    examples: Sequence[Example], folds: Sequence[Sequence[int]], data_dir: Path
) -> list[tuple[Path, Path]]:
    """(train file, validation file) per fold: validation = fold k, train = every other fold."""
    paths = []
    for k, fold in enumerate(folds, start=1):
        held = set(fold)
        train = [ex for i, ex in enumerate(examples) if i not in held]
        val = [examples[i] for i in fold]
        paths.append(
            (
                write_examples_jsonl(data_dir / f"fold-{k}-train.jsonl", train),
                write_examples_jsonl(data_dir / f"fold-{k}-validation.jsonl", val),
            )
        )
    return paths


def fold_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers of one run's summary that cross-validation averages."""
    out = {
        key: float(value)
        for key, value in (summary.get("eval") or {}).items()
        if isinstance(value, int | float) and not isinstance(value, bool) and key != "eval_tokens"
    }
    out.update({key: float(summary[key]) for key in TRAIN_KEYS if key in summary})
    return out


def aggregate(per_fold: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (n - 1) of each metric present in every fold."""
    names = [name for name in per_fold[0] if all(name in fold for fold in per_fold)]
    mean = {name: statistics.fmean(fold[name] for fold in per_fold) for name in names}
    std = {
        name: statistics.stdev([fold[name] for fold in per_fold]) if len(per_fold) > 1 else 0.0
        for name in names
    }
    return {"mean": mean, "std": std}


def fold_config(cfg: RunConfig, train: Path, validation: Path, run_dir: Path) -> RunConfig:
    """The run config of one fold: its own data files and run directory, all else unchanged."""
    raw = cfg.to_dict()
    raw["data"].update(train=str(train), validation=str(validation), format="auto")
    raw["output"].update(dir=str(run_dir))
    return build_config(raw)


def run_cross_validation(
    cfg: RunConfig,
    k: int,
    *,
    show_progress: bool = True,
    train_fn: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Train one run per fold and write OUTPUT_DIR/cv.json; returns what it holds."""
    out_dir = Path(cfg.output.dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not cfg.output.overwrite:
        raise RunDirError(
            f"output.dir: {out_dir} is not empty; choose another output.dir or set "
            "output.overwrite=true"
        )
    if isinstance(cfg.data.validation, str):
        log.info("cv: data.validation (%s) is not used; folds of data.train validate", cfg.data.validation)  # fmt: skip
    resolve_model_dir(cfg.model.name)  # a broken model fails before any fold file is written
    loaded = load_examples(cfg.data.train, cfg.data.format, cfg.data.on_bad_row)
    try:
        folds = fold_indices(len(loaded.examples), k, cfg.train.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    files = write_folds(loaded.examples, folds, out_dir / "folds")
    if train_fn is None:
        from tuneforge.recipes.train import run_training as train_fn
    results = []
    for i, (train_path, val_path) in enumerate(files, start=1):
        log.info("cv: fold %d of %d (%d validation rows)", i, k, len(folds[i - 1]))
        fold_cfg = fold_config(cfg, train_path, val_path, out_dir / f"fold-{i}")
        outcome = train_fn(fold_cfg, show_progress=show_progress)
        results.append(
            {
                "fold": i,
                "run_dir": str(out_dir / f"fold-{i}"),
                "train_rows": len(loaded.examples) - len(folds[i - 1]),
                "validation_rows": len(folds[i - 1]),
                "metrics": fold_metrics(outcome.summary),
            }
        )
    result = {
        "folds": k,
        "seed": cfg.train.seed,
        "data": {
            "train": cfg.data.train,
            "rows_read": loaded.rows_read,
            "rows_used": len(loaded.examples),
            "rows_dropped": len(loaded.bad_rows),
        },
        "per_fold": results,
        **aggregate([r["metrics"] for r in results]),
        "std_kind": "sample (n - 1)",
    }
    write_json_atomic(out_dir / CV_FILE, result)
    return result
