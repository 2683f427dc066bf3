"""`data check` for the page: counts, bad rows as file:line, a token-length histogram, one example.

The data is prepared by `recipes.parts.prepare_run_data`, exactly as training would; this module
only shapes its report for the template (histogram bins, trained-token spans).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tuneforge.config import RunConfig
from tuneforge.constants import IGNORE_INDEX
from tuneforge.errors import DataError

HISTOGRAM_BINS = 20


@dataclass
class CheckResult:
    report: dict[str, Any] | None = None
    bad_rows: list[str] = field(default_factory=list)  # "file:line: reason"
    stops_training: str | None = None  # the error training would stop with (on_bad_row: fail)
    histogram: list[dict[str, float]] = field(default_factory=list)
    example_source: str | None = None
    example: list[tuple[str, bool]] = field(default_factory=list)  # (text, carries loss)


def histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> list[dict[str, float]]:
    """Equal-width bins over [min, max]; each {lo, hi, count}; the last bin includes max."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bins))
    n = -(-(high - low + 1) // width)
    counts = [0] * n
    for value in lengths:
        counts[(value - low) // width] += 1
    return [
        {"lo": low + i * width, "hi": low + (i + 1) * width - 1, "count": c}
        for i, c in enumerate(counts)
    ]


def trained_spans(
    input_ids: list[int], labels: list[int], tokenizer: Any
) -> list[tuple[str, bool]]:
    """The example decoded in runs of tokens that do / do not carry loss."""
    spans: list[tuple[str, bool]] = []
    run: list[int] = []
    trained: bool | None = None
    for token, label in zip(input_ids, labels, strict=True):
        is_trained = label != IGNORE_INDEX
        if run and is_trained != trained:
            spans.append((tokenizer.decode(run, skip_special_tokens=False), bool(trained)))
            run = []
        run.append(token)
        trained = is_trained
    if run:
        spans.append((tokenizer.decode(run, skip_special_tokens=False), bool(trained)))
    return spans


def check_data(cfg: RunConfig, shorten: Any = str) -> CheckResult:
    """Prepare the run's data as training would; on bad rows that would stop training, prepare
    it again with `on_bad_row: skip` so that the counts are still shown. `shorten` maps file
    paths to what the page shows (workspace-relative)."""
    from tuneforge.recipes.parts import load_run_tokenizer, prepare_run_data

    tokenizer = load_run_tokenizer(cfg)
    result = CheckResult()
    try:
        data = prepare_run_data(cfg, tokenizer)
    except DataError as err:
        if not err.bad_rows or cfg.data.on_bad_row == "skip":
            raise
        result.stops_training = str(err).splitlines()[0]
        skipping = cfg.model_copy(
            update={"data": cfg.data.model_copy(update={"on_bad_row": "skip"})}
        )
        data = prepare_run_data(skipping, tokenizer)
    report = data.report.to_dict()
    result.bad_rows = [
        f"{shorten(row['path'])}:{row['line']}: {row['reason']}" for row in report.pop("bad_rows")
    ]
    result.report = report
    result.histogram = histogram([len(ex.input_ids) for ex in data.train + data.validation])
    if data.train:
        first = data.train[0]
        path, _, line = first.source.rpartition(":")
        result.example_source = f"{shorten(path)}:{line}" if path else first.source
        result.example = trained_spans(first.input_ids, first.labels, tokenizer)
    return result
