"""What the chunked, labelled-only loss saves: peak memory and time of the output head + loss.

Each variant runs forward and backward alone in a fresh process (SmolLM2's head: 576 -> 49152,
bf16 autocast, a batch of 8 x 512 positions) so that its peak RSS is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "full logits, every position (HF ForCausalLMLoss)": ("full", 1.0),
    "chunked, every position labelled": ("chunked", 1.0),
    "chunked, 25 % of positions labelled": ("chunked", 0.25),
}

_CHILD = r"""
import json, resource, sys, time, torch
import torch.nn.functional as F
from tuneforge.train.loss import linear_cross_entropy, label_positions
mode, frac = sys.argv[1], float(sys.argv[2])
torch.manual_seed(0)
B, T, H, V = 8, 512, 576, 49152
head = torch.nn.Linear(H, V, bias=False).to(torch.bfloat16)
hidden = torch.randn(B, T, H, dtype=torch.bfloat16, requires_grad=True)
labels = torch.randint(0, V, (B, T))
labels[torch.rand(B, T) > frac] = -100
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
with torch.autocast("cpu", dtype=torch.bfloat16):
    if mode == "full":
        logits = head(hidden).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                               reduction="sum")
    else:
        mask, targets = label_positions(labels)
        loss = linear_cross_entropy(hidden[mask], head.weight, targets)
loss.backward()
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"extra_peak_mb": peak - base, "seconds": elapsed, "loss": float(loss)}))
"""


def measure(mode: str, frac: float) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(frac)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_all() -> dict[str, dict[str, float]]:
    return {name: measure(*args) for name, args in VARIANTS.items()}


if __name__ == "__main__":
    print(json.dumps(measure_all(), indent=1))
