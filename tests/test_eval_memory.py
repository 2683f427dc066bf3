"""Evaluation memory stays flat as the evaluation set grows (no logits pile up across batches).

Peak RSS on a shared 2-core machine is noisy and dominated by the allocator, so instead every
tensor created during evaluation is tracked (a TorchDispatchMode) and the peak of the bytes
they hold alive at once is compared at two set sizes; a control that keeps each batch's logits
shows the measure does grow when memory is not bounded.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tuneforge.data.formats import Example
from tuneforge.data.pipeline import TokenizedExample, collate
from tuneforge.data.templates import render
from tuneforge.evaluation.validation import ValidationScorer
from tuneforge.train.loop import evaluate_loss

from conftest import build_tiny_llama
from helpers import COLORS, THINGS

SMALL, LARGE = 8, 32


class LiveTensorBytes(TorchDispatchMode):
    """Peak of the storage bytes held alive by tensors created inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors]
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs or {}))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            ptr = t.untyped_storage().data_ptr()
            entry = self.refs.get(ptr)
            if entry is None:
                if ptr in inputs or ptr == 0:  # a view of a tensor made outside: not ours
                    continue
                entry = self.refs[ptr] = [t.untyped_storage().nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out

    def _release(self, ptr: int) -> None:
        entry = self.refs.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.refs[ptr]


def _rows(tokenizer, n: int) -> list[TokenizedExample]:
    """n labelled rows of the same shape (so batches are alike at both sizes)."""
    rows = []
    for i in range(n):
        thing, color = THINGS[i % len(THINGS)], COLORS[i % 2]
        ex = Example(
            messages=[
                {"role": "user", "content": f"Color of {thing}?"},
                {"role": "assistant", "content": color},
            ],
            source=f"mem:{i}",
        )
        rows.append(TokenizedExample(*render(tokenizer, ex), source=ex.source))
    return rows


class _OneProcess:
    num_processes, process_index, device = 1, 0, torch.device("cpu")


def _peak(run) -> int:
    mode = LiveTensorBytes()
    with torch.no_grad(), mode:
        run()
    return mode.peak


def _loss(model, tok, rows):
    evaluate_loss(model, rows, lambda b: collate(b, tok.pad_token_id), _OneProcess(), 4)


def _generation(model, tok, rows):
    scorer = ValidationScorer(
        tok, rows, ["exact_match", "accuracy"], generate=True, max_new_tokens=4, batch_size=4
    )
    scorer(model, _OneProcess())


def _label_scores(model, tok, rows):
    ValidationScorer(tok, rows, ["accuracy"], generate=False, batch_size=4)(model, _OneProcess())


def _keeps_logits(model, tok, rows):
    """The bug the test guards against: logits of every batch kept until the end."""
    kept = [
        model(**collate(rows[i : i + 4], tok.pad_token_id)).logits for i in range(0, len(rows), 4)
    ]
    return len(kept)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    # A larger vocabulary than the tokenizer's makes logits the dominant allocation, as in real
    # models (49k vocab against a 576 hidden size).
    return build_tiny_llama(4096).eval()


@pytest.mark.parametrize("path", [_loss, _generation, _label_scores], ids=lambda f: f.__name__)
def test_eval_peak_memory_is_flat_in_the_set_size(path, model, tiny_tokenizer):
    small = _peak(lambda: path(model, tiny_tokenizer, _rows(tiny_tokenizer, SMALL)))
    large = _peak(lambda: path(model, tiny_tokenizer, _rows(tiny_tokenizer, LARGE)))
    assert small > 0
    # 4x the rows: one batch's worth of memory either way (10 % slack for per-row results).
    assert large <= 1.1 * small, (small, large)


def test_the_measure_sees_memory_that_grows(model, tiny_tokenizer):
    small = _peak(lambda: _keeps_logits(model, tiny_tokenizer, _rows(tiny_tokenizer, SMALL)))
    large = _peak(lambda: _keeps_logits(model, tiny_tokenizer, _rows(tiny_tokenizer, LARGE)))
    assert large > 2 * small, (small, large)
