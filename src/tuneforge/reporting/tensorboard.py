"""TensorBoard logging of the metrics.jsonl records (log.tensorboard: true), via torch's writer.

The tensorboard package is optional (`pip install 'tuneforge[tensorboard]'`); which records are
written, and when, is the recipe's choice. Event files go under RUN_DIR/tensorboard/.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Record keys that are counters or positions, not curves worth a chart.
_SKIP = {"step", "epoch", "tokens", "loss_tokens", "elapsed_s", "eval_tokens"}


class TensorBoardMissing(ImportError):
    """log.tensorboard is on but the tensorboard package is not installed."""


def _summary_writer_class():
    try:
        import tensorboard  # noqa: F401  (torch's writer needs it; import it to fail clearly)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise TensorBoardMissing(
            "log.tensorboard: true needs the tensorboard package: "
            "pip install 'tuneforge[tensorboard]' (or pip install tensorboard), "
            "or set log.tensorboard: false"
        ) from err
    return SummaryWriter


def tag_for(key: str) -> str:
    """`loss` -> `train/loss`, `eval_bleu` -> `eval/bleu`: one chart group per phase."""
    if key.startswith("eval_"):
        return "eval/" + key.removeprefix("eval_")
    return "train/" + key


class TensorBoardSink:
    """Writes every finite number of a record as a scalar at the record's step."""

    def __init__(self, run_dir: str | Path) -> None:
        writer_class = _summary_writer_class()  # before any directory is made
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = writer_class(log_dir=str(self.log_dir))

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key in _SKIP or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(tag_for(key), float(value), step)
        if "warning" in record:
            self.writer.add_text("warnings", str(record["warning"]), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
