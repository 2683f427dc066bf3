"""Evaluation during training: validation loss, label / generation metrics, keep-best, overfitting.

A component with plain arguments: the recipe builds it and the loop calls it with the step; what
the run records (metrics.jsonl, TensorBoard) is the `emit` callback's business.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tuneforge.evaluation.validation import ValidationScorer, append_samples, reset_samples
from tuneforge.train.callbacks import EarlyStopping, OverfitMonitor
from tuneforge.train.loop import evaluate_loss


class Evaluator:
    """Called with the step at each evaluation; returns True when early stopping says stop."""

    def __init__(
        self,
        model: torch.nn.Module,
        validation: Sequence[Any],
        collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
        accelerator: Any,
        *,
        batch_size: int,
        autocast: torch.dtype | None,
        emit: Callable[[dict[str, Any]], None],
        stopper: EarlyStopping | None = None,
        monitor: OverfitMonitor | None = None,
        scorer: ValidationScorer | None = None,
        for_inference: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
        samples_dir: Path | None = None,
        positions_aligned: bool = True,
    ) -> None:
        self.model, self.validation, self.collate_fn = model, validation, collate_fn
        self.accelerator, self.batch_size, self.autocast = accelerator, batch_size, autocast
        self.emit, self.stopper, self.scorer = emit, stopper, scorer
        self.monitor = monitor or OverfitMonitor()
        self.for_inference, self.samples_dir = for_inference, samples_dir
        self.positions_aligned = positions_aligned
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last: dict[str, float] = {}
        self.train_losses: list[float] = []

    @property
    def active(self) -> bool:
        return bool(self.validation)

    def start(self, resumed: bool) -> None:
        """A fresh run starts with no samples file; a resumed one appends to its own."""
        if self.samples_dir is not None and not resumed:
            reset_samples(self.samples_dir)

    def note_train_loss(self, record: dict[str, Any]) -> None:
        if "nonfinite" not in record:  # a skipped step has no loss to average
            self.train_losses.append(record["loss"])

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run evaluates and stops exactly the same."""
        return {
            "stopper": self.stopper.state_dict() if self.stopper else None,
            "monitor": self.monitor.state_dict(),
            "best_state": self.best_state,
            "last": self.last,
            "train_losses": list(self.train_losses),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.stopper is not None and state["stopper"] is not None:
            self.stopper.load_state_dict(state["stopper"])
        self.monitor.load_state_dict(state["monitor"])
        self.best_state, self.last = state["best_state"], state["last"]
        self.train_losses = list(state["train_losses"])

    def __call__(self, step: int) -> bool:
        if not self.validation:
            return False
        metrics = self._measure(step)
        self.last = metrics
        losses, self.train_losses = self.train_losses, []
        train_loss = sum(losses) / len(losses) if losses else math.nan
        warning = self.monitor.update(step, train_loss, metrics["eval_loss"])
        record = {"step": step, "train_loss": train_loss, **metrics}
        if warning:
            record["warning"] = warning
            if self.accelerator.is_main_process:  # above the progress bar, not through it
                tqdm.write(f"warning: {warning}", file=sys.stderr)
        self.emit(record)
        if self.stopper is None:
            return False
        if self.stopper.update(metrics[self.stopper.metric], step):
            self.best_state = {
                n: p.detach().clone().cpu()
                for n, p in self._unwrapped().named_parameters()
                if p.requires_grad
            }
        return self.stopper.should_stop

    def _measure(self, step: int) -> dict[str, float]:
        metrics = evaluate_loss(
            self.model,
            self.validation,
            self.collate_fn,
            self.accelerator,
            self.batch_size,
            self.autocast,
            self.positions_aligned,
        )
        if self.scorer is not None:
            extra, samples = self.scorer(self.for_inference(self._unwrapped()), self.accelerator)
            metrics.update(extra)
            if self.samples_dir is not None:
                append_samples(self.samples_dir, step, samples)
        return metrics

    def _unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def restore_best(self) -> None:
        """Put the best evaluation's trainable weights back (early stopping's keep-best)."""
        if self.best_state is None:
            return
        with torch.no_grad():
            for name, param in self._unwrapped().named_parameters():
                if name in self.best_state:
                    param.copy_(self.best_state[name].to(param.device))

    def best(self) -> dict[str, Any] | None:
        """The best evaluation as summary.json records it, or None without early stopping."""
        if self.stopper is None:
            return None
        s = self.stopper
        return {"metric": s.metric, "value": s.best, "step": s.best_step}
