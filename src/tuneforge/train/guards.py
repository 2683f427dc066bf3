"""Guards the training loop consults once per step: non-finite loss/gradients (R5) and stop signals.

The loop decides what a step is; these only judge a step's numbers or a pending SIGINT/SIGTERM
and say what to do. Exit codes: 3 for a non-finite halt, 128 + signal for an interrupt.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuneforge.errors import NonFiniteError

NONFINITE_POLICIES = ("halt", "skip")
NONFINITE_EXIT_CODE = 3
INTERRUPT_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
MAX_LISTED_ROWS = 16


def nonfinite_parts(loss: float, grad_norm: float | None) -> dict[str, str]:
    """{"loss": "nan", "grad_norm": "inf"}: which of the step's numbers are not finite."""
    parts = {}
    for name, value in (("loss", loss), ("grad_norm", grad_norm)):
        if value is not None and not math.isfinite(value):
            parts[name] = repr(float(value))
    return parts


def _rows_text(rows: Sequence[str]) -> str:
    shown = ", ".join(rows[:MAX_LISTED_ROWS])
    more = f" and {len(rows) - MAX_LISTED_ROWS} more" if len(rows) > MAX_LISTED_ROWS else ""
    return shown + more


@dataclass
class NonFiniteGuard:
    """`halt`: stop at the first bad step. `skip`: drop the step's update (weights and optimizer
    state stay bitwise unchanged) and stop after `max_bad_steps` bad steps in a row."""

    policy: str = "halt"
    max_bad_steps: int = 3

    def __post_init__(self) -> None:
        if self.policy not in NONFINITE_POLICIES:
            raise ValueError(
                f"train.on_nonfinite: {self.policy!r} is not one of {', '.join(NONFINITE_POLICIES)}"
            )
        if self.max_bad_steps < 1:
            raise ValueError(f"train.max_bad_steps: must be >= 1, got {self.max_bad_steps}")

    def record(
        self, step: int, epoch: int, parts: dict[str, str], rows: Sequence[str], in_a_row: int
    ) -> dict[str, Any]:
        """The metrics.jsonl line for a bad step (written whatever the policy)."""
        halting = self.policy == "halt" or in_a_row >= self.max_bad_steps
        return {
            "step": step,
            "epoch": epoch,
            "loss": None,
            "nonfinite": parts,
            "action": "halt" if halting else "skip",
            "bad_steps_in_a_row": in_a_row,
            "rows": list(rows),
        }

    def check(self, step: int, parts: dict[str, str], rows: Sequence[str], in_a_row: int) -> None:
        """Raise NonFiniteError when the run must stop; return when the step is just skipped."""
        what = ", ".join(f"{k} {v}" for k, v in parts.items())
        where = f"rows: {_rows_text(rows)}"
        if self.policy == "halt":
            raise NonFiniteError(
                f"non-finite {what} at step {step} (train.on_nonfinite: halt); {where}. "
                "No update and no checkpoint were made from this step; set "
                "train.on_nonfinite: skip to drop such steps instead."
            )
        if in_a_row >= self.max_bad_steps:
            raise NonFiniteError(
                f"non-finite {what} at step {step}: {in_a_row} bad steps in a row "
                f"(train.max_bad_steps: {self.max_bad_steps}); {where}."
            )


class StopSignals:
    """While active, the first SIGINT/SIGTERM only asks the loop to checkpoint and stop at the end
    of the step; a second one exits at once (130 for SIGINT, 143 for SIGTERM), saving nothing."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __call__(self) -> int:
        """The pending signal number, or 0."""
        return self.signum

    def _handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum:
            sys.stderr.write(f"\n{name} again: exiting now without a checkpoint\n")
            sys.stderr.flush()
            os._exit(INTERRUPT_EXIT_CODES.get(signum, 128 + signum))
        self.signum = signum
        sys.stderr.write(
            f"\n{name}: finishing this step, saving a checkpoint, then stopping "
            "(send it again to exit at once)\n"
        )
        sys.stderr.flush()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in INTERRUPT_EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def interrupt_exit_code(signum: int) -> int:
    return INTERRUPT_EXIT_CODES.get(signum, 128 + signum)
