"""Micro-benchmark of issue 18's LoRA levers: one LoRA step with each lever off in turn, and one
full fine-tuning step, on the same packed batch, alternated in one process (SmolLM2-135M).

`python bench/lora_levers.py [--tokens 4096] [--repeats 5] [--threads N] [--dtype fp32]`: prints
ms per step (forward + backward, optimizer step) per variant, the LoRA/full ratio, the losses,
and the mask-fill kernels side by side ("both off" is main's fused branch except for its mask fill,
which has no switch: the fill kernels are timed on their own).
The end-to-end side-by-side with HF Trainer + peft is bench/run.py's business.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = [
    ROOT / "runs" / "bench" / "data" / "L512-n512" / "train.jsonl",  # bench/run.py writes it
    ROOT / "data" / "generated" / "sentiment" / "train.jsonl",  # make quickstart writes it
]
MODEL = "smollm2-135m-instruct"
LORA = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.05}  # bench/notes.md's workload


def packed_batch(path: Path, tokenizer, tokens: int) -> dict[str, torch.Tensor]:
    """The first rows of `path` that fit in `tokens`, packed in one row as `tuneforge train` does."""
    from tuneforge.data.packing import pack_examples
    from tuneforge.data.pipeline import prepare_data

    rows = prepare_data(path, None, tokenizer, max_length=512, truncation="drop").train
    picked, total = [], 0
    for row in rows:
        if total + len(row.input_ids) > tokens:
            break
        picked.append(row)
        total += len(row.input_ids)
    return pack_examples(picked)


def build(method: dict, dtype: torch.dtype, threads: int | None):
    """(model, optimizer) as the train recipe sets them up (lr 0: every repeat sees the same
    weights, so the losses compare, while AdamW still does all of its work)."""
    from tuneforge.config import build_config
    from tuneforge.methods import build_method
    from tuneforge.models import load_model, resolve_model_dir
    from tuneforge.recipes.parts import upcast_trainable
    from tuneforge.train.fastpath import prepare_fast_path
    from tuneforge.train.optim import build_optimizer

    cfg = build_config({"method": method, "data": {"train": "x"}})
    model = build_method(cfg.method).apply(load_model(resolve_model_dir(MODEL), dtype))
    upcast_trainable(model)
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: without values the adapters change no loss
            param.data.normal_(0, 0.02, generator=gen)
    autocast = dtype == torch.bfloat16
    prepare_fast_path(model, autocast=autocast, packing=True, compile=False, num_threads=threads)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer([{"params": params, "lr": 0.0}], (0.9, 0.999), 1e-8)
    return model.train(), optimizer


def step(model, optimizer, batch, autocast: bool) -> tuple[float, float, float, float]:
    """(forward + backward wall s, optimizer wall s, process CPU s, loss) of one seeded step."""
    from tuneforge.train.loss import CausalLMLoss

    n = float((batch["labels"][:, 1:] != -100).sum())
    torch.manual_seed(0)  # the same dropout draws for every repeat
    cpu, start = time.process_time(), time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
        loss = CausalLMLoss(model)(model, batch, n)
    loss.backward()
    middle = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    return middle - start, end - middle, time.process_time() - cpu, float(loss.detach())


def variants(lora, full):
    """(name, model, optimizer, levers or None): the LoRA step with each lever off, and full FT."""
    from tuneforge.train.fused_lora import Levers

    return [
        ("lora: all levers on", *lora, Levers()),
        ("lora: fold off", *lora, Levers(fold=False)),
        ("lora: shared masks off", *lora, Levers(share_masks=False)),
        ("lora: both off", *lora, Levers(fold=False, share_masks=False)),
        ("full fine-tuning", *full, None),
    ]


def measure(runs, batch, repeats: int, autocast: bool) -> dict[str, list[tuple]]:
    """Every variant once per round (after one warm-up round), rounds alternating."""
    from tuneforge.train.fused_lora import use_fused_lora

    times: dict[str, list[tuple]] = {name: [] for name, *_ in runs}
    for round_ in range(repeats + 1):
        for name, model, optimizer, levers in runs:
            if levers is not None:
                use_fused_lora(model, levers)
            result = step(model, optimizer, batch, autocast)
            if round_:  # round 0 warms up oneDNN's primitives and the allocator
                times[name].append(result)
                print(
                    f"  round {round_}: {name}: {1e3 * (result[0] + result[1]):.0f} ms", flush=True
                )
    return times


def report(times: dict[str, list[tuple]]) -> None:
    """Median ms per variant, the LoRA/full ratio and what each lever saves."""
    med = {k: [statistics.median(r[i] for r in v) for i in range(4)] for k, v in times.items()}
    print(
        f"\n{'variant':26s} {'fwd+bwd ms':>10s} {'optim ms':>9s} {'step ms':>8s} "
        f"{'CPU ms':>8s} {'loss':>10s}"
    )
    for name, (fb, opt, cpu, loss) in med.items():
        print(
            f"{name:26s} {1e3 * fb:10.0f} {1e3 * opt:9.1f} {1e3 * (fb + opt):8.0f} "
            f"{1e3 * cpu:8.0f} {loss:10.6f}"
        )
    new, full = med["lora: all levers on"], med["full fine-tuning"]
    print(
        f"\nfull / LoRA step time: {(full[0] + full[1]) / (new[0] + new[1]):.2f}x "
        f"(forward + backward only: {full[0] / new[0]:.2f}x; issue 18's target >= 1.3x)"
    )
    for name in ("lora: fold off", "lora: shared masks off", "lora: both off"):
        saved = (med[name][0] - new[0]) / med[name][0]
        print(f"levers on vs {name[6:]}: forward + backward {100 * saved:+.1f} % time saved")
    print(
        "Losses: variants with the same masks agree to ~1e-6; shared vs per-adapter masks "
        "are different dropout draws (the same distribution), so they differ slightly."
    )


def fill_kernels(tokens: int, dtype: torch.dtype, repeats: int = 50) -> None:
    """The mask fill lever alone (no switch in the model: the values are bit for bit the same):
    masked_fill_ vs train/dropout.zero_where on the step's activation shapes."""
    from tuneforge.train.dropout import drop_mask, zero_where

    for width in (576, 1536):
        x = torch.randn(tokens, width).to(dtype)
        drop = drop_mask(x.shape, 0.05, x.device)
        cost = {}
        fills = {
            "masked_fill_": lambda x=x, drop=drop: x.masked_fill_(drop, 0),
            "zero_where": lambda x=x, drop=drop: zero_where(drop, x, inplace=True),
        }
        for name, fill in fills.items():
            fill()
            start = time.perf_counter()
            for _ in range(repeats):
                fill()
            cost[name] = 1e3 * (time.perf_counter() - start) / repeats
        print(
            f"mask fill {tokens} x {width}: masked_fill_ {cost['masked_fill_']:.2f} ms, "
            f"zero_where {cost['zero_where']:.2f} ms"
        )


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens in the packed batch")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="default: one per core")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--data", type=Path, default=None, help="chat JSONL (default: bench data)")
    args = p.parse_args(argv)
    path = args.data or next((d for d in DATA if d.is_file()), None)
    if path is None or not path.is_file():
        raise SystemExit("no data: pass --data FILE.jsonl (e.g. make quickstart's train.jsonl)")
    from tuneforge.models import load_tokenizer, resolve_model_dir

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    batch = packed_batch(path, load_tokenizer(resolve_model_dir(MODEL)), args.tokens)
    lora, full = build(LORA, dtype, args.threads), build({"name": "full"}, dtype, args.threads)
    labelled = int((batch["labels"] != -100).sum())
    print(
        f"{path}: {batch['input_ids'].shape[1]} tokens packed ({labelled} labelled), "
        f"{args.dtype}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()}"
    )
    times = measure(variants(lora, full), batch, args.repeats, dtype == torch.bfloat16)
    report(times)
    fill_kernels(batch["input_ids"].shape[1], dtype)
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
