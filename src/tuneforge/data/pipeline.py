"""Tokenise train/validation files under an explicit truncation policy, count every row, and batch.

Leaves parsing to formats.py, rendering to templates.py, and the model and training loop to others.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuneforge.constants import IGNORE_INDEX
from tuneforge.data.formats import (
    BadRow,
    Example,
    LoadResult,
    bad_rows_error,
    list_bad_rows,
    load_examples,
)
from tuneforge.data.templates import render
from tuneforge.errors import ConfigError, TemplateError

TRUNCATION = ("truncate", "drop", "error")
_HINTS = {
    "over_length": "set data.truncation: truncate or drop, or raise data.max_length",
    "render_error": "set data.on_bad_row: skip to drop them, or pick another data.template",
}


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    source: str


@dataclass
class DataReport:
    format: str
    rows_read: int
    rows_used: int
    dropped: dict[str, int]
    truncated: int
    bad_rows: list[BadRow]
    train_size: int
    validation_size: int
    token_lengths: dict[str, float]
    # Augmented copies of training rows: counts by op, dropped copies by reason. They are not
    # rows of the file: rows_read / rows_used / dropped count the file's rows only.
    augmentation: dict[str, Any] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PreparedData:
    train: list[TokenizedExample]
    validation: list[TokenizedExample]
    report: DataReport


#: (train examples, validation examples) -> (new training copies, counts for the report).
AugmentHook = Callable[[list[Example], list[Example]], tuple[list[Example], dict[str, Any]]]


@dataclass
class _Tally:
    """What happened to each row that was not used, plus rows that must stop the run."""

    dropped: list[BadRow] = field(default_factory=list)
    fatal: list[BadRow] = field(default_factory=list)
    truncated: int = 0


def prepare_data(
    train_path: str | Path,
    validation: float | str | Path | None,
    tokenizer: Any,
    *,
    fmt: str = "auto",
    max_length: int = 512,
    truncation: str = "truncate",
    on_bad_row: str = "fail",
    train_on: str = "assistant",
    seed: int = 0,
    augment: AugmentHook | None = None,
) -> PreparedData:
    """Load, render and truncate the train file and its validation set (a ratio, a file or none).

    `augment` makes extra copies of the training split only, after the validation split is made.
    """
    if truncation not in TRUNCATION:
        raise ConfigError(f"data.truncation: {truncation!r} is not one of {', '.join(TRUNCATION)}")
    if max_length < 1:
        raise ConfigError(f"data.max_length: must be at least 1, got {max_length}")
    loads = [load_examples(train_path, fmt, on_bad_row)]
    train_examples, val_examples = loads[0].examples, []
    if isinstance(validation, bool):
        raise ConfigError(
            "data.validation: expected a ratio in (0, 1), a path or null, got a boolean"
        )
    if isinstance(validation, int | float):
        train_examples, val_examples = split_examples(train_examples, float(validation), seed)
    elif isinstance(validation, str | Path):
        loads.append(load_examples(validation, fmt, on_bad_row))
        val_examples = loads[1].examples
    elif validation is not None:
        raise ConfigError(f"data.validation: expected a ratio, a path or null, got {validation!r}")

    tally = _Tally(dropped=[row for load in loads for row in load.bad_rows])
    options = dict(
        max_length=max_length, truncation=truncation, train_on=train_on, on_bad_row=on_bad_row
    )
    train = _tokenize_all(train_examples, tokenizer, tally, **options)
    val = _tokenize_all(val_examples, tokenizer, tally, **options)
    _raise_if_fatal(tally.fatal)
    report = _build_report(loads, train, val, tally)
    if not train:
        raise bad_rows_error(
            f"{train_path}: no usable training rows; every row was dropped:", tally.dropped
        )
    if isinstance(validation, str | Path) and not val:
        raise bad_rows_error(
            f"{validation}: no usable validation rows; every row was dropped:", tally.dropped
        )
    if augment is not None:
        train = train + _augmented(
            augment, train_examples, val_examples, tokenizer, report, options
        )
    return PreparedData(train=train, validation=val, report=report)


def _augmented(
    augment: AugmentHook,
    train_examples: list[Example],
    val_examples: list[Example],
    tokenizer: Any,
    report: DataReport,
    options: dict[str, Any],
) -> list[TokenizedExample]:
    """Tokenised copies of the training rows; copies that cannot be used are dropped and counted
    (never fatal: a copy is not a row of the user's file)."""
    copies, counts = augment(train_examples, val_examples)
    tally = _Tally()
    lenient = {**options, "on_bad_row": "skip"}
    if lenient["truncation"] == "error":
        lenient["truncation"] = "drop"
    out = _tokenize_all(copies, tokenizer, tally, **lenient)
    dropped = Counter(row.kind for row in tally.dropped + tally.fatal)
    report.augmentation = {**counts, "used": len(out), "dropped_in_tokenizing": dict(dropped)}
    report.train_size += len(out)
    return out


def split_examples(
    examples: list[Example], ratio: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded random split by example; both sides keep file order; each side gets >= 1 when possible."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"data.validation: a ratio must be in (0, 1), got {ratio}")
    n = len(examples)
    if n < 2:
        return list(examples), []
    n_val = min(max(round(n * ratio), 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [ex for i, ex in enumerate(examples) if i not in val_idx]
    val = [ex for i, ex in enumerate(examples) if i in val_idx]
    return train, val


def _tokenize_all(
    examples: list[Example],
    tokenizer: Any,
    tally: _Tally,
    *,
    max_length: int,
    truncation: str,
    train_on: str,
    on_bad_row: str,
) -> list[TokenizedExample]:
    out = []
    for example in examples:
        path, line = _where(example.source)
        try:
            ids, labels = render(tokenizer, example, train_on)
        except TemplateError as e:
            row = BadRow(path, line, f"cannot render: {e}", "render_error")
            (tally.fatal if on_bad_row == "fail" else tally.dropped).append(row)
            continue
        if len(ids) > max_length:
            too_long = BadRow(
                path, line, f"{len(ids)} tokens > max_length {max_length}", "over_length"
            )
            if truncation != "truncate":
                (tally.fatal if truncation == "error" else tally.dropped).append(too_long)
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE_INDEX for label in labels):
                reason = f"no trainable tokens left after truncation to max_length {max_length}"
                tally.dropped.append(BadRow(path, line, reason, "no_trainable_tokens"))
                continue
            tally.truncated += 1
        elif all(label == IGNORE_INDEX for label in labels):
            tally.dropped.append(BadRow(path, line, "no trainable tokens", "no_trainable_tokens"))
            continue
        out.append(TokenizedExample(input_ids=ids, labels=labels, source=example.source))
    return out


def _where(source: str) -> tuple[str, int]:
    path, _, line = source.rpartition(":")
    return (path, int(line)) if line.isdigit() else (source, 0)


def _raise_if_fatal(fatal: list[BadRow]) -> None:
    if not fatal:
        return
    kinds = sorted({row.kind for row in fatal})
    hints = "; ".join(_HINTS[kind] for kind in kinds if kind in _HINTS)
    raise bad_rows_error(f"{len(fatal)} rows cannot be used ({hints}):", fatal)


def _build_report(
    loads: list[LoadResult],
    train: list[TokenizedExample],
    val: list[TokenizedExample],
    tally: _Tally,
) -> DataReport:
    rows_read = sum(load.rows_read for load in loads)
    rows_used = len(train) + len(val)
    dropped = dict(sorted(Counter(row.kind for row in tally.dropped).items()))
    if rows_read != rows_used + sum(dropped.values()):  # R4: a row may never vanish uncounted
        raise RuntimeError(
            f"row accounting broken: read {rows_read} != used {rows_used} + dropped {dropped}"
        )
    return DataReport(
        format=loads[0].format,
        rows_read=rows_read,
        rows_used=rows_used,
        dropped=dropped,
        truncated=tally.truncated,
        bad_rows=list(tally.dropped),
        train_size=len(train),
        validation_size=len(val),
        token_lengths=length_stats([len(ex.input_ids) for ex in train + val]),
    )


def length_stats(lengths: list[int]) -> dict[str, float]:
    """min, mean, p50, p95, max (linear-interpolated percentiles); zeros for no lengths."""
    if not lengths:
        return {"min": 0.0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}
    ordered = sorted(lengths)

    def percentile(q: float) -> float:
        pos = q * (len(ordered) - 1)
        low, high = math.floor(pos), math.ceil(pos)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    return {
        "min": float(ordered[0]),
        "mean": sum(ordered) / len(ordered),
        "p50": percentile(0.5),
        "p95": percentile(0.95),
        "max": float(ordered[-1]),
    }


def collate(
    batch: list[TokenizedExample], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids (pad_id), attention_mask (0 on pads), labels (-100 on pads)."""
    if not batch:
        raise ValueError("collate: the batch is empty")
    width = max(len(ex.input_ids) for ex in batch)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def format_check_report(data: PreparedData, tokenizer: Any) -> str:
    """Human-readable summary for `tuneforge data check`; trained tokens appear inside [[...]]."""
    r = data.report
    dropped = ", ".join(f"{kind} {n}" for kind, n in r.dropped.items()) or "none"
    lengths = ", ".join(f"{k} {v:g}" for k, v in r.token_lengths.items())
    lines = [
        f"format: {r.format}",
        f"rows: read {r.rows_read}, used {r.rows_used}, dropped {sum(r.dropped.values())} ({dropped})",
        f"truncated: {r.truncated}",
        f"split: train {r.train_size}, validation {r.validation_size}",
        f"token lengths: {lengths}",
    ]
    if r.augmentation:
        a = r.augmentation
        lines.insert(
            4,
            f"augmented: {a['used']} copies of {a['rows']} training rows in the train split "
            f"(by op {a['by_op']}; dropped {a['dropped'] or 'none'})",
        )
    if r.bad_rows:
        lines += [f"dropped rows ({len(r.bad_rows)}):", list_bad_rows(r.bad_rows)]
    if data.train:
        first = data.train[0]
        lines += [
            f"first training example ({first.source}); tokens with loss are inside [[...]]:",
            show_loss_mask(first, tokenizer),
        ]
    return "\n".join(lines)


def show_loss_mask(example: TokenizedExample, tokenizer: Any) -> str:
    """Decode an example, wrapping each run of trained tokens (label != -100) in [[...]]."""
    pieces, run, trained = [], [], None
    for token, label in zip(example.input_ids, example.labels, strict=True):
        is_trained = label != IGNORE_INDEX
        if run and is_trained != trained:
            pieces.append(_decode_run(tokenizer, run, trained))
            run = []
        run.append(token)
        trained = is_trained
    if run:
        pieces.append(_decode_run(tokenizer, run, trained))
    return "".join(pieces)


def _decode_run(tokenizer: Any, ids: list[int], trained: bool | None) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"[[{text}]]" if trained else text
