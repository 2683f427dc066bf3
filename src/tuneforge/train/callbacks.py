"""Early stopping and an overfitting monitor over evaluation results: pure Python, no torch.

The training loop decides when to evaluate, averages the train loss and acts on the answers.
"""

from __future__ import annotations

import math
from typing import Any

MODES = ("min", "max")


class EarlyStopping:
    """Stop after ``patience`` evaluations in a row without an improvement beyond ``min_delta``."""

    def __init__(
        self, patience: int, metric: str = "eval_loss", mode: str = "min", min_delta: float = 0.0
    ) -> None:
        if patience < 1:
            raise ValueError(f"early_stopping.patience: must be >= 1, got {patience}")
        if mode not in MODES:
            raise ValueError(f"early_stopping.mode: {mode!r} is not one of {', '.join(MODES)}")
        if min_delta < 0:
            raise ValueError(f"early_stopping.min_delta: must be >= 0, got {min_delta}")
        self.patience = patience
        self.metric = metric
        self.mode = mode
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.num_bad_evals = 0

    def is_improvement(self, value: float) -> bool:
        """True when ``value`` beats the best so far by more than min_delta (NaN never does)."""
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, step: int | None = None) -> bool:
        """Record one evaluation; True when it is a new best."""
        if self.is_improvement(value):
            self.best, self.best_step, self.num_bad_evals = float(value), step, 0
            return True
        self.num_bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.num_bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
            "num_bad_evals": self.num_bad_evals,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters; a different metric or mode is refused (patience may change)."""
        for field in ("metric", "mode"):
            if state[field] != getattr(self, field):
                raise ValueError(
                    f"early_stopping.{field}: checkpoint has {state[field]!r}, "
                    f"config has {getattr(self, field)!r}"
                )
        self.best = state["best"]
        self.best_step = state["best_step"]
        self.num_bad_evals = int(state["num_bad_evals"])


class OverfitMonitor:
    """Warn when eval loss rose for ``patience`` evaluations in a row while train loss fell.

    Each record keeps ``gap = eval_loss - train_loss``. The warning comes once per streak, at
    the evaluation that completes it; a fresh streak can warn again.
    """

    def __init__(self, patience: int = 3) -> None:
        if patience < 1:
            raise ValueError(f"overfit patience: must be >= 1, got {patience}")
        self.patience = patience
        self.records: list[dict[str, float]] = []
        self.streak = 0

    def update(self, step: int, train_loss: float, eval_loss: float) -> str | None:
        """Record one evaluation (train_loss: mean since the previous one); a warning or None."""
        previous = self.records[-1] if self.records else None
        self.records.append(
            {
                "step": step,
                "train_loss": train_loss,
                "eval_loss": eval_loss,
                "gap": eval_loss - train_loss,
            }
        )
        if previous is None:
            return None
        diverging = eval_loss > previous["eval_loss"] and train_loss < previous["train_loss"]
        self.streak = self.streak + 1 if diverging else 0
        if self.streak != self.patience:
            return None
        start = self.records[-1 - self.patience]
        return (
            f"possible overfitting at step {step}: eval loss rose {self.patience} evaluations "
            f"in a row ({start['eval_loss']:.4f} -> {eval_loss:.4f}) while train loss fell "
            f"({start['train_loss']:.4f} -> {train_loss:.4f}); "
            f"gap eval - train {start['gap']:.4f} -> {eval_loss - train_loss:.4f}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records], "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = [dict(r) for r in state["records"]]
        self.streak = int(state["streak"])
