"""Profile one LoRA training step of the bench workload: the top operators by self CPU time.

`python bench/profile_step.py [--rows 8] [--threads 1] [--dtype auto] [--method lora|full]`:
tuneforge's model, method and fast path as `tuneforge train` sets them up (`auto`: bf16 where the
CPU computes it natively, else fp32), one packed batch of bench rows, forward + backward under
torch.profiler.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "runs" / "bench" / "data" / "L512-n512" / "train.jsonl"
METHODS = {
    "lora": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.05},
    "full": {"name": "full"},
}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--method", choices=sorted(METHODS), default="lora")
    p.add_argument("--data", type=Path, default=DATA, help="chat JSONL (default: the bench data)")
    p.add_argument("--lora-levers-off", action="store_true", help="fused LoRA as before issue 18")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tuneforge.config import build_config
    from tuneforge.data.packing import pack_examples
    from tuneforge.data.pipeline import prepare_data
    from tuneforge.methods import build_method
    from tuneforge.models import load_model, load_tokenizer, resolve_dtype, resolve_model_dir
    from tuneforge.recipes.parts import upcast_trainable
    from tuneforge.train.fastpath import prepare_fast_path
    from tuneforge.train.loss import CausalLMLoss

    if not args.data.is_file():
        raise SystemExit(f"{args.data}: missing; `make bench` (or bench/run.py) writes it first")
    model_dir = resolve_model_dir("smollm2-135m-instruct")
    tokenizer = load_tokenizer(model_dir)
    rows = prepare_data(args.data, None, tokenizer, max_length=512, truncation="drop").train
    batch = pack_examples(rows[: args.rows])
    cfg = build_config({"method": METHODS[args.method], "data": {"train": "x"}})
    dtype = resolve_dtype(args.dtype, "cpu")
    autocast = dtype == torch.bfloat16
    model = build_method(cfg.method).apply(load_model(model_dir, dtype))
    upcast_trainable(model)
    prepare_fast_path(
        model, autocast=autocast, packing=True, compile=False, num_threads=args.threads
    )
    if args.lora_levers_off:
        from tuneforge.train.fused_lora import Levers, use_fused_lora

        use_fused_lora(model, Levers(fold=False, share_masks=False))
    model.train()
    loss_fn = CausalLMLoss(model)
    n = float((batch["labels"][:, 1:] != -100).sum())
    tokens = int(batch["input_ids"].numel())

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model, batch, n)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm up (oneDNN primitives, allocator)
    start, cpu = time.perf_counter(), time.process_time()
    step()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(
        f"{args.method}, {dtype}, {tokens} tokens, {args.threads} thread(s): {wall:.2f} s wall, "
        f"{cpu:.2f} s CPU per step"
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{'operator':40s} {'self CPU %':>10s} {'ms':>9s} {'calls':>7s}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        share = 100 * e.self_cpu_time_total / total
        print(f"{e.key[:40]:40s} {share:10.1f} {e.self_cpu_time_total / 1e3:9.1f} {e.count:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
