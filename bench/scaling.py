"""Scaling rows for docs/scaling.md: tokens/s and peak memory of every process, one process against
two (DDP and FSDP2), LoRA and full fine-tuning, each row a real `tuneforge train [--nproc N]` run.

Numbers come from the runs' summary.json (loop-only tokens/s; peak RSS or CUDA peak per rank);
the load average is recorded beside each row. Not part of the tests; a quiet machine is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

#: name -> (method, strategy, processes); the global batch is the same in every row.
ROWS = {
    "lora-1": ("lora", "single", 1),
    "lora-ddp-2": ("lora", "ddp", 2),
    "lora-fsdp2-2": ("lora", "fsdp2", 2),
    "full-1": ("full", "single", 1),
    "full-ddp-2": ("full", "ddp", 2),
    "full-fsdp2-2": ("full", "fsdp2", 2),
}
MARK_BEGIN, MARK_END = "<!-- scaling:{} -->", "<!-- /scaling:{} -->"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a model name, or `tiny`")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "scaling.json"))
    p.add_argument("--out", default=str(ROOT / "docs" / "scaling.md"))
    p.add_argument("--data-dir", default=str(ROOT / "runs" / "bench" / "data"))
    return p.parse_args(argv)


def tiny_model(where: Path) -> Path:
    """A 2-block random Llama with the embedded model's tokenizer (for quick plumbing rows)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.models import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir("smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


def run_row(name: str, args: argparse.Namespace, model: str, data: Path, tmp: Path) -> dict:
    method, strategy, nproc = ROWS[name]
    cfg = {
        "model": {"name": model, "dtype": "auto"},
        "method": {"name": method} | ({"r": 16, "alpha": 32} if method == "lora" else {}),
        "data": {"train": str(data), "validation": None, "max_length": args.max_length},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.global_batch // nproc,
            "lr": 2e-4 if method == "lora" else 2e-5,
            "strategy": strategy,
            "num_threads": args.threads,
        },
        "eval": {"every_steps": None},
        "checkpoint": {"every_steps": None, "at_epoch_end": False},
        "log": {"report": False},
        "output": {"dir": str(tmp / name), "overwrite": True},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "tuneforge.cli", "train", str(path), "--quiet"]
    cmd += ["--nproc", str(nproc)] if nproc > 1 else []
    load_before, started = os.getloadavg()[0], time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"failed": proc.returncode, "stderr": proc.stderr[-2000:]}
    s = json.loads((tmp / name / "summary.json").read_text())
    return {
        "method": method,
        "strategy": strategy,
        "processes": nproc,
        "tokens_per_s": s["tokens_per_s"],
        "peak_memory_mb_per_rank": s["peak_memory_mb_per_rank"],
        "final_train_loss": s["final_train_loss"],
        "wall_s": round(time.time() - started, 1),
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| row | method | strategy | processes | tokens/s (all) | peak MB per rank | final loss "
        "| load avg (before, after) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        if "failed" in r:
            lines.append(f"| {name} | failed (exit {r['failed']}) | | | | | | |")
            continue
        peaks = ", ".join(f"{v:.0f}" for v in r["peak_memory_mb_per_rank"])
        lines.append(
            f"| {name} | {r['method']} | {r['strategy']} | {r['processes']} "
            f"| {r['tokens_per_s']:.0f} | {peaks} | {r['final_train_loss']:.4f} "
            f"| {r['load_avg'][0]}, {r['load_avg'][1]} |"
        )
    return "\n".join(lines)


def write_section(doc: Path, key: str, body: str) -> None:
    """Replace the text between this model's markers in `doc` (appended when absent)."""
    begin, end = MARK_BEGIN.format(key), MARK_END.format(key)
    text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text, encoding="utf-8")


def main(argv: list[str]) -> int:
    from run import bench_data  # bench/run.py: the benchmark's own rows of real reviews

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tuneforge-scaling-") as tmp_name:
        tmp = Path(tmp_name)
        model = str(tiny_model(tmp / "tiny")) if args.model == "tiny" else args.model
        data = bench_data(args.max_length, args.steps * args.global_batch, Path(args.data_dir))
        rows = {}
        for name in args.rows.split(","):
            print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
            rows[name] = run_row(name, args, model, data, tmp)
            print(f"    {rows[name]}", flush=True)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "rows": rows}
    results.write_text(json.dumps(record, indent=1))
    header = (
        f"Measured {record['date']}: `python bench/scaling.py {' '.join(argv)}` "
        f"({args.steps} steps, global batch {args.global_batch}, max_length {args.max_length})."
    )
    write_section(Path(args.out), args.model, header + "\n\n" + table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
