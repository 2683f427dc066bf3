"""Where a run's metric records go: metrics.jsonl always, TensorBoard when asked.

The records themselves come from the loop and the evaluator; this only fans them out.
"""

from __future__ import annotations

from typing import Any

from tuneforge.errors import ConfigError
from tuneforge.train.rundir import RunDir


class RecordSinks:
    """metrics.jsonl (through the run directory) and an optional TensorBoard writer."""

    def __init__(self, run: RunDir | None, tensorboard: Any = None) -> None:
        self.run, self.tensorboard = run, tensorboard

    def emit(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(record)
        if self.tensorboard is not None:
            self.tensorboard.log(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def open_sinks(run: RunDir | None, tensorboard: bool) -> RecordSinks:
    """Sinks for `run` (None on ranks other than 0); a missing tensorboard is a ConfigError."""
    if not (tensorboard and run is not None):
        return RecordSinks(run)
    from tuneforge.reporting.tensorboard import TensorBoardMissing, TensorBoardSink

    try:
        return RecordSinks(run, TensorBoardSink(run.path))
    except TensorBoardMissing as err:
        raise ConfigError(str(err)) from None
