"""`tuneforge plan CONFIG [--memory 8GB]`: predicted peak memory and time of a run, before it runs.

Argument parsing and printing only; the prediction is recipes/plan.py.
"""

from __future__ import annotations

import argparse
import re

from tuneforge.errors import UsageError

UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="predict a run's peak memory and time without loading weights",
        description="Predict peak memory (by item) and time per step / epoch / run from the "
        "model's config and the tokenised data; with --memory, list the changes that fit.",
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.batch_size=4")
    p.add_argument("--memory", help="memory to fit in, e.g. 8GB or 512MB (default: available now)")
    p.set_defaults(func=cmd_plan)


def parse_memory(text: str) -> int:
    """'8GB', '8G', '8GiB', '512MB', '1.5g' -> bytes (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"--memory: {text!r} is not a size like 8GB, 512MB or 1.5G")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def cmd_plan(args: argparse.Namespace) -> int:
    budget = parse_memory(args.memory) if args.memory else None
    from tuneforge.config import load_config

    cfg = load_config(args.config, args.overrides)
    import accelerate  # noqa: F401  (the trainer's imports, so the measured base is the trainer's)
    import peft  # noqa: F401

    from tuneforge.heap import training_heap
    from tuneforge.recipes.parts import prepare_run_data
    from tuneforge.recipes.plan import estimate, plan_tokenizer

    data = prepare_run_data(cfg, plan_tokenizer(cfg))
    plan = estimate(cfg, data, budget_bytes=budget, heap=training_heap())
    print(format_plan(plan))
    return 0


def _gb(n: float) -> str:
    return f"{n / 1024**3:7.2f} GB"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def format_plan(plan) -> str:
    from tuneforge.train.estimate import parameter_counts, trainable_parameters

    arch, work, mem, t = plan.arch, plan.work, plan.memory, plan.time
    total = parameter_counts(arch)["total"]
    trainable = trainable_parameters(arch, plan.spec)
    worst = mem.peak_batch
    lines = [
        f"model  {plan.model}: {total / 1e6:.1f}M parameters ({arch.model_type}, "
        f"{arch.layers} blocks, hidden {arch.hidden}, vocab {arch.vocab})",
        f"method {plan.spec.name}: {trainable / 1e6:.2f}M trainable",
        f"data   {sum(len(b) for b in work.batches)} rows, {len(work.batches)} micro-batches "
        f"per epoch ({'packed' if work.packing else 'padded'}); the largest: {len(worst)} rows, "
        f"{work.tokens(worst)} tokens, {sum(n for _, n in worst)} labelled",
        "",
        f"peak memory (predicted, while {mem.when}):",
    ]
    lines += [f"  {name:<28}{_gb(value)}" for name, value in mem.items.items()]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(
        f"  {'total':<28}{_gb(mem.peak_bytes)}   budget {_gb(plan.budget_bytes).strip()} "
        f"({plan.budget_source}): {verdict}"
    )
    m = plan.machine
    lines += [
        "",
        f"time (this machine: {m.matmul_flops / 1e9:.0f} GFLOP/s matmul, "
        f"{m.rate('attention_flops') / 1e9:.0f} GFLOP/s attention, "
        f"{m.bandwidth / 1e9:.1f} GB/s; calibration cached):",
        f"  per step  {t.step_s:.2f} s  ({t.flops_per_step / 1e12:.2f} TFLOP), of which",
    ]
    lines += [f"    {name:<26}{seconds:7.2f} s" for name, seconds in t.items.items()]
    lines += [
        f"  per epoch {_duration(t.epoch_s)}  ({t.steps_per_epoch} steps)",
        f"  run       {_duration(t.total_s)}  ({t.total_steps} steps)",
    ]
    if plan.suggestions:
        lines += ["", "changes that fit, least quality cost first:"]
        for s in plan.suggestions:
            lines.append(
                f"  {' '.join(s.overrides):<46} peak {_gb(s.memory.peak_bytes).strip()}, "
                f"{s.time.step_s:.2f} s/step  ({s.cost})"
            )
    return "\n".join(lines)
