"""The deployment table of docs/deploy.md: a finished run exported as merged, NF4, q8_0 and q4_k_m,
each re-checked (size, load time, peak RSS, tokens/s, held-out loss / accuracy), plus transformers'
own `generate()` on the same cores for the llama.cpp speed ratio. Not part of the tests.

    python bench/export_bench.py runs/quickstart --data data/generated/sentiment/test.jsonl

Needs a quiet machine: every number is wall-clock on the cores given (--threads, default all).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from tuneforge.loading import load_run
from tuneforge.models import resolve_dtype
from tuneforge.recipes.export import ExportJob, export_run


def timed_export(job: ExportJob) -> tuple[dict, float]:
    start = time.perf_counter()
    outcome = export_run(job)
    return outcome.report, time.perf_counter() - start


def hf_generate_tokens_per_s(run_dir: Path, dtype: str, threads: int, new_tokens: int) -> float:
    """transformers' own `generate()` (greedy, exactly `new_tokens`) on the run as trained."""
    torch.set_num_threads(threads)
    loaded = load_run(run_dir, resolve_dtype(dtype))
    messages = [{"role": "user", "content": "Write three short sentences about the sea."}]
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    loaded.model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    start = time.perf_counter()
    loaded.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return new_tokens / (time.perf_counter() - start)


def markdown(rows: list[dict], export_s: dict[str, float]) -> str:
    metrics = [m for m in ("loss", "perplexity", "accuracy", "macro_f1") if m in rows[0]["metrics"]]
    head = ["artefact", "size MB", "load s", "peak RSS MB", "gen tok/s", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["name"], f"{r['size_mb']:.1f}", f"{r['load_s']:.2f}", f"{r['peak_rss_mb']:.0f}"]
        cells.append(f"{r['gen_tokens_per_s']:.1f}")
        for m in metrics:
            delta = (r.get("deltas") or {}).get(m)
            cells.append(
                f"{r['metrics'][m]:.4f}" + (f" ({delta:+.4f})" if delta is not None else "")
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- export + re-check, {k}: {v:.1f} s wall" for k, v in export_s.items()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", help="held-out file (default: the run's validation split)")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--out", type=Path, default=Path("bench/results/export"))
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    common = dict(data=args.data, limit=args.limit, threads=args.threads, overwrite=True)
    reports, export_s = {}, {}
    for fmt, quants in (("gguf", ["q8_0", "q4_k_m"]), ("merged", None), ("nf4", None)):
        job = ExportJob(args.run_dir, fmt, out=args.out / fmt, **common)
        if quants:
            job.quants = quants
        reports[fmt], export_s[fmt] = timed_export(job)
    rows = [reports["gguf"]["artefacts"][0], reports["merged"]["artefacts"][1]]
    rows += [reports["nf4"]["artefacts"][1], *reports["gguf"]["artefacts"][1:]]
    dtype = str(reports["gguf"].get("dtype", "auto"))
    hf = hf_generate_tokens_per_s(args.run_dir, dtype, args.threads, args.new_tokens)
    q4 = next(r for r in rows if r["name"] == "gguf-q4_k_m")["gen_tokens_per_s"]
    text = markdown(rows, export_s)
    text += f"\n- transformers generate(): {hf:.1f} tok/s; llama.cpp q4_k_m: {q4:.1f} tok/s "
    text += f"({q4 / hf:.1f}x) on {args.threads} threads\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    (args.out / "reports.json").write_text(json.dumps(reports, indent=2))
    print(text)


if __name__ == "__main__":
    main()
