"""Test helpers: toy datasets and run configs for the tiny in-process models.

Kept in tests/, never shipped inside the package.
"""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

COLORS = ["red", "green", "blue", "black", "white", "pink"]
THINGS = ["apple", "sky", "grass", "night", "snow", "rose", "fox", "book"]


def random_examples(lengths, vocab: int = 300, seed: int = 0) -> list:
    """Tokenized examples of these lengths, random ids, the second half of each labelled."""
    from tuneforge.data.pipeline import TokenizedExample

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        labels = [-100] * (n // 2) + ids[n // 2 :]
        out.append(TokenizedExample(input_ids=ids, labels=labels, source=f"f:{i + 1}"))
    return out


def write_toy_messages(path: Path, n: int = 64, seed: int = 0) -> Path:
    """A learnable toy task: 'Color of X?' -> a fixed color per thing (variable lengths)."""
    rng = random.Random(seed)
    answer = {t: COLORS[i % len(COLORS)] for i, t in enumerate(THINGS)}
    rows = []
    for _ in range(n):
        thing = rng.choice(THINGS)
        filler = " ".join(rng.choice(THINGS) for _ in range(rng.randint(0, 6)))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"{filler} Color of {thing}?".strip()},
                    {"role": "assistant", "content": answer[thing]},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_run_config(
    path: Path, model_dir: Path, train_file: Path, out_dir: Path, **sections
) -> Path:
    """A small run config for the tiny model; `sections` update the defaults section by section."""
    cfg = {
        "model": {"name": str(model_dir), "dtype": "fp32"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(train_file), "validation": 0.125, "max_length": 64},
        "train": {"max_steps": 8, "batch_size": 4, "lr": 5e-3, "scheduler": "constant", "seed": 0},
        "eval": {"every_steps": 4},
        "checkpoint": {"every_steps": None},
        "output": {"dir": str(out_dir)},
    }
    for section, values in sections.items():
        merge = (
            isinstance(values, dict) and section != "method"
        )  # a method section is replaced whole
        cfg[section] = {**cfg.get(section, {}), **values} if merge else values
    path.write_text(yaml.safe_dump(cfg))
    return path


class CpuAccelerator:
    """The slice of accelerate.Accelerator the training loop uses, for one CPU process."""

    device = torch.device("cpu")
    num_processes, process_index, is_main_process = 1, 0, True

    def backward(self, loss):
        loss.backward()

    def no_sync(self, model):
        return nullcontext()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
