"""`python bench/eval_bench.py [--rows 200] [--repeats 3]`: evaluation speed, side by side.

Scores the quickstart's held-out rows (loss + label accuracy) on the embedded model three ways in
one process, alternating: tuneforge's evaluation (`evaluate_examples`), the previous tuneforge
loss pass (full-vocabulary logits for every position), and a plain transformers loop (full
logits for the loss, one full forward per row and label for accuracy). Prints rows/s and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def plain_loop(model, tokenizer, examples, labels, batch_size):
    """What a user writes with transformers alone: full logits, log-softmax, one pass per label."""
    from tuneforge.data.pipeline import TokenizedExample, collate
    from tuneforge.data.templates import render
    from tuneforge.evaluation.runner import _with_answer, sequence_logprobs

    items = [TokenizedExample(*render(tokenizer, ex), source="") for ex in examples]
    for i in range(0, len(items), batch_size):
        sequence_logprobs(model, collate(items[i : i + batch_size], pad_id=tokenizer.pad_token_id))
    for ex in examples:
        scored = [TokenizedExample(*render(tokenizer, _with_answer(ex, lab)), "") for lab in labels]
        sequence_logprobs(model, collate(scored, pad_id=tokenizer.pad_token_id))


def old_loss(model, tokenizer, examples, batch_size):
    """The loss pass tuneforge eval used before (full logits, rows in file order)."""
    from tuneforge.data.pipeline import TokenizedExample, collate
    from tuneforge.data.templates import render
    from tuneforge.evaluation.runner import sequence_logprobs

    items = [TokenizedExample(*render(tokenizer, ex), source="") for ex in examples]
    for i in range(0, len(items), batch_size):
        sequence_logprobs(model, collate(items[i : i + batch_size], pad_id=tokenizer.pad_token_id))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="data/generated/sentiment/test.jsonl")
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    from tuneforge.data.formats import load_examples
    from tuneforge.evaluation.runner import evaluate_examples, label_predictions
    from tuneforge.loading import load_reference

    loaded = load_reference("smollm2-135m-instruct")
    model, tok = loaded.model, loaded.tokenizer
    examples = load_examples(args.data, "auto", "fail").examples[: args.rows]
    labels = sorted({ex.label for ex in examples})
    sides = {
        "tuneforge": lambda: evaluate_examples(
            model, tok, examples, ["loss", "accuracy"], args.batch_size
        ),
        "tuneforge_before": lambda: (
            old_loss(model, tok, examples, args.batch_size),
            label_predictions(model, tok, examples, labels, args.batch_size),
        ),
        "plain_transformers": lambda: plain_loop(model, tok, examples, labels, args.batch_size),
    }
    times: dict[str, list[float]] = {k: [] for k in sides}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, run in sides.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "rows": len(examples),
        "dtype": str(next(model.parameters()).dtype),
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0],
        "seconds": med,
        "rows_per_s": {k: len(examples) / v for k, v in med.items()},
        "speedup_vs_before": med["tuneforge_before"] / med["tuneforge"],
        "speedup_vs_plain": med["plain_transformers"] / med["tuneforge"],
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main(sys.argv[1:]))
