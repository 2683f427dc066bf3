"""Render bench/results/*.json as docs/performance.md: the tables, the machine, and bench/notes.md.

Numbers come only from the results file; the hand-written analysis lives in bench/notes.md.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: Issue 18's targets: the main row's tokens/s ratio (with AMX, without), its peak-memory ratio
#: and last-8-step loss gap; every other row's tokens/s ratio.
TARGET_SPEEDUP_AMX, TARGET_SPEEDUP, TARGET_MEMORY, TARGET_LOSS_GAP = 4.0, 3.3, 0.35, 0.02
TARGET_OTHER_ROWS = 2.5


def machine() -> dict[str, str]:
    import peft
    import torch
    import transformers

    cpu, flags = "unknown", ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(
            line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line
        )
        flags = " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in info)
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": f"{cpu} ({os.cpu_count()} cores; {flags or 'no bf16 flags'})",
        "memory": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _main_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| row | side | real tokens/s | ratio | tokens per CPU-second | ratio | peak memory (MB) "
        "| ratio | MFU (bf16) | first loss | final loss (mean of last 8 steps) | tokens/s of each run |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in summary.items():
        if "tuneforge" not in row:
            lines.append(f"| {name} | failed runs: {row['failed']} |" + " |" * 10)
            continue
        full = name.startswith("full")  # the baseline fine-tunes every weight: no peft
        baseline = "HF Trainer" if full else "HF Trainer + peft"
        for side, label in (("tuneforge", "tuneforge"), ("hf", baseline)):
            s = row[side]
            ours = side == "tuneforge"
            speed = f"**{row['speedup']:.2f}x**" if ours else "1"
            cpu = f"{row['cpu_speedup']:.2f}x" if ours else "1"
            mem = f"**{row['memory_ratio']:.2f}x**" if ours else "1"
            lines.append(
                f"| {name} | {label} | {s['tokens_per_s']:.1f} | {speed} | "
                f"{s['tokens_per_cpu_s']:.1f} | {cpu} | {s['peak_memory_mb']:.0f} | {mem} | "
                f"{100 * s['mfu']:.1f} % | {s['first_loss']:.3f} | {s['final_loss']:.3f} | "
                f"{', '.join(map(str, s['tokens_per_s_all']))} |"
            )
    return lines


def _loss_memory(rows: dict[str, Any]) -> list[str]:
    lines = [
        "| head + loss (8 x 512 positions, vocab 49,152, bf16) | extra peak RSS (MB) | time (s) "
        "| loss |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['extra_peak_mb']:.0f} | {r['seconds']:.2f} | {r['loss']:.1f} |"
        )
    return lines


def _per_side(summary: dict[str, Any], key: str = "threads") -> str:
    """What the workers reported of themselves (thread count, heap allocator), per side."""
    seen = {
        side: sorted({str(row[side].get(key, "?")) for row in summary.values() if side in row})
        for side in ("tuneforge", "hf")
    }
    return "; ".join(f"{side} {', '.join(map(str, n)) or '?'}" for side, n in seen.items())


def _targets(summary: dict[str, Any], amx: bool) -> list[str]:
    """Issue 18's targets, met or not, for the rows this run measured."""
    lines = []
    main = summary.get("lora-512")
    if main and "hf" in main and "tuneforge" in main:
        want = TARGET_SPEEDUP_AMX if amx else TARGET_SPEEDUP
        gap = abs(main["tuneforge"]["final_loss"] - main["hf"]["final_loss"])
        lines.append(
            f"Targets on the main row (LoRA, max length 512): tokens/s ratio >= {want} "
            f"({'with' if amx else 'without'} AMX) -- {_verdict(main['speedup'] >= want)} "
            f"({main['speedup']:.2f}); peak memory ratio <= {TARGET_MEMORY} -- "
            f"{_verdict(main['memory_ratio'] <= TARGET_MEMORY)} ({main['memory_ratio']:.2f}); "
            f"last-8-step loss within {TARGET_LOSS_GAP} -- {_verdict(gap <= TARGET_LOSS_GAP)} "
            f"({gap:.3f})."
        )
    others = {k: v for k, v in summary.items() if k != "lora-512" and "speedup" in v}
    if others:
        each = ", ".join(
            f"{k} {_verdict(v['speedup'] >= TARGET_OTHER_ROWS)} ({v['speedup']:.2f})"
            for k, v in others.items()
        )
        lines.append(f"Target on every other row: tokens/s ratio >= {TARGET_OTHER_ROWS} -- {each}.")
    return [*lines, ""] if lines else []


def render(state: dict[str, Any]) -> str:
    summary = state.get("summary", {})
    args = state.get("args", {})
    peak = state.get("peak_gflops", {})
    m = machine()
    out = [
        "# Performance",
        "",
        "Generated by `make bench` (`bench/run.py`) from `bench/results/latest.json`; do not edit "
        "the tables by hand. tuneforge and the HF Trainer + peft baseline train the same rows in "
        "the same order with the same hyperparameters; each run is a separate process, the two "
        "sides alternate, and every number is the median over the runs listed.",
        "",
        f"- measured: {state.get('started', '?')} to {state.get('finished', 'unfinished')}",
        f"- machine: {m['cpu']}, {m['memory']}; device `{args.get('device', 'cpu')}`; "
        f"torch threads per process, as each worker measured them: {_per_side(summary)}; "
        f"heap allocator: {_per_side(summary, 'allocator')}",
        f"- software: Python {m['python']}, torch {m['torch']}, transformers "
        f"{m['transformers']}, peft {m['peft']}",
        f"- measured GEMM peak on this machine: bf16 {peak.get('bf16', 0):.0f} GFLOP/s, fp32 "
        f"{peak.get('fp32', 0):.0f} GFLOP/s (2048^3 matmul, best of 8)",
        f"- steps per run: main row {args.get('steps')}, full FT "
        f"{args.get('full_steps') or args.get('steps')}, scaling rows "
        f"{args.get('scaling_steps') or args.get('steps')}; runs per side: {args.get('repeats')}",
        "",
        "## Side by side",
        "",
        *_main_table(summary),
        "",
    ]
    out += _targets(summary, "amx_bf16" in m["cpu"])
    out += _curves(summary)
    if state.get("loss_memory"):
        out += ["## The loss without full logits", "", *_loss_memory(state["loss_memory"]), ""]
    out += _load(summary)
    notes = ROOT / "bench" / "notes.md"
    if notes.is_file():
        out += [notes.read_text(encoding="utf-8").rstrip(), ""]
    return "\n".join(out)


def _curves(summary: dict[str, Any]) -> list[str]:
    lines = ["## Loss curves (median per step)", ""]
    for name, row in summary.items():
        if "tuneforge" not in row:
            continue
        tf, hf = row["tuneforge"]["losses"], row["hf"]["losses"]
        n = min(len(tf), len(hf))
        if not n:
            continue
        diff = max(abs(a - b) for a, b in zip(tf[:n], hf[:n], strict=True))
        marks = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})
        cells = ", ".join(f"step {i + 1}: {tf[i]:.3f} / {hf[i]:.3f}" for i in marks)
        lines.append(f"- {name} (tuneforge / HF): {cells}; largest per-step gap {diff:.3f}")
    return [*lines, ""]


def _load(summary: dict[str, Any]) -> list[str]:
    loads = [
        load
        for row in summary.values()
        if "tuneforge" in row
        for s in ("tuneforge", "hf")
        for load in row[s]["load_avg"]
    ]
    if not loads:
        return []
    worst = max(max(pair) for pair in loads)
    return [
        f"Machine load (1-minute load average at the start and end of each run): up to "
        f"{worst:.1f} on {os.cpu_count()} cores. Above the core count other processes shared "
        "the CPU during the measurement, which slows both sides and adds noise; the sides "
        "alternate so that neither is favoured.",
        "",
    ]


def write_report(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(state), encoding="utf-8")
