"""Measure this machine for the plan at the model's shapes: GEMM and attention rates, memory
bandwidth, the cost of an eager op; a few seconds once, cached per CPU, threads, torch and shape.

Also this process's resident memory and the memory still available. The arithmetic that uses
these numbers is train/timing.py; only the shapes of the model reach here.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from tuneforge.models import cache_root
from tuneforge.paths import write_json_atomic
from tuneforge.train import math_attention
from tuneforge.train.dropout import drop_mask
from tuneforge.train.estimate import FP32, Architecture
from tuneforge.train.timing import ATTENTION_BACKWARD, Machine

CALIBRATION_FILE = "calibration.json"
#: The longest example the attention rate is measured at; longer ones are scaled by FLOPs. The
#: kernel gets faster per FLOP with length (at 512 the rate predicted 1024-token steps 15-35 %
#: slow), and one 1024-token case with backward costs ~0.1 s here.
ATTENTION_MAX = 1024
#: Bytes of logits the loss rate is measured over: above glibc's largest mmap threshold (32 MB),
#: as the real loss's chunks (512 x vocab) and prompt learning's full logits are.
LOSS_BYTES = 48 << 20


def current_rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; 0 where it cannot be read)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def available_memory_bytes(device: str = "cpu") -> int:
    """Memory a new allocation can still get: free GPU memory, or the kernel's MemAvailable."""
    if device == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_name() -> str:
    """The CPU model (/proc/cpuinfo), for calibration keys and reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timed(fn, seconds: float) -> float:
    """Seconds per call of `fn`: the median of repeated calls within about `seconds` (the
    median, not the best: on a shared machine training sees the typical share of the CPU)."""
    fn()  # warm up (allocation, thread pool)
    times: list[float] = []
    while sum(times) < seconds or len(times) < 3:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _randn(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(len(shape) + sum(shape))
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)


def gemm_rates(arch: Architecture, m: int, dtype: torch.dtype, seconds: float) -> dict:
    """FLOP/s of one block's linears over m positions: forward (x @ W.T), input gradients
    (g @ W) and weight gradients (g.T @ x), each timed over all seven shapes together."""
    shapes = list(arch.linears().values())
    xs = {n: _randn(m, n, dtype=dtype) for n in {a for a, _ in shapes} | {b for _, b in shapes}}
    ws = [_randn(b, a, dtype=dtype) for a, b in shapes]
    flops = 2 * m * sum(a * b for a, b in shapes)
    kinds = {
        "matmul_flops": lambda: [F.linear(xs[a], w) for (a, _), w in zip(shapes, ws, strict=True)],
        "dgrad_flops": lambda: [xs[b] @ w for (_, b), w in zip(shapes, ws, strict=True)],
        "wgrad_flops": lambda: [xs[b].T @ xs[a] for a, b in shapes],
    }
    return {name: flops / _timed(fn, seconds / 3) for name, fn in kinds.items()}


def attention_rates(
    arch: Architecture, n: int, dtype: torch.dtype, seconds: float, math: bool = True
) -> dict:
    """FLOP/s (as train/timing.py counts them) of SDPA over one n-token example: causal
    without a mask (the packed path, keys and values at their own heads), and with a boolean
    padding mask (keys and values repeated to every head); forward alone, and with backward.
    `math`: the packed path's backward runs train/math_attention.py's kernel where bf16
    training would (a run whose residual stream is fp32, as full fine-tuning's, keeps SDPA)."""
    h, kv, d = arch.heads, arch.kv_heads, arch.head_dim
    causal_flops = 4 * n * (n + 1) // 2 * arch.q_dim
    masked_flops = 4 * n * n * arch.q_dim
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    cases = {
        "attention": (kv, {"is_causal": True, "enable_gqa": kv != h}, causal_flops),
        "masked_attention": (h, {"attn_mask": mask}, masked_flops),
    }
    rates = {}
    for name, (kv_heads, kwargs, flops) in cases.items():
        for grad in (False, True):
            q = _randn(1, h, n, d, dtype=dtype, grad=grad)
            k, v = (_randn(1, kv_heads, n, d, dtype=dtype, grad=grad) for _ in range(2))

            # bf16 training attends short examples with train/math_attention.py's kernel.
            use_math = math and name == "attention" and math_attention.applies(q, 0.0, {})

            def run(q=q, k=k, v=v, kwargs=kwargs, grad=grad, use_math=use_math) -> None:
                if use_math:
                    out = math_attention.causal_attention(q, k, v, None)
                else:
                    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
                if grad:
                    out.sum().backward()

            total = flops * (1 + ATTENTION_BACKWARD) if grad else flops
            key = f"{name}_flops" if grad else f"{name}_forward_flops"
            rates[key] = total / _timed(run, seconds / 4)
    return rates


def lora_rate(arch: Architecture, m: int, r: int, dtype: torch.dtype, seconds: float) -> float:
    """FLOP/s of the rank-r products of LoRA branches on the block's linears over m positions
    (x A and h B forward; B's, h's, A's and x's gradients backward): skinny, memory-bound."""
    shapes = list(arch.linears().values())
    xs = {n: _randn(m, n, dtype=dtype) for n in {a for a, _ in shapes} | {b for _, b in shapes}}
    h = _randn(m, r, dtype=dtype)
    mats = [(_randn(r, a, dtype=dtype), _randn(b, r, dtype=dtype)) for a, b in shapes]

    def branches() -> None:
        for (a_in, b_out), (a, b) in zip(shapes, mats, strict=True):
            x, g = xs[a_in], xs[b_out]
            F.linear(F.linear(x, a), b)
            g.T @ h, g @ b, h.T @ x, h @ a

    flops = 6 * m * r * sum(a + b for a, b in shapes)
    return flops / _timed(branches, seconds)


class _BranchProbe(torch.autograd.Function):
    """train/fused_lora.py's branch in Python shape (autocast off, saved tensors, mask, six
    products), on tiny tensors: what one call costs beyond its arithmetic."""

    @staticmethod
    def forward(ctx, x, a, b, p: float):
        with torch.autocast(x.device.type, enabled=False):
            xc, scaled = x.to(x.dtype), (a * 2.0).to(a.dtype)
            drop = drop_mask(x.shape, p, x.device) if p > 0.0 else None
            xd = xc if drop is None else xc.masked_fill(drop, 0)
            h = F.linear(xd, scaled)
            out = F.linear(h, b) * 0.5
        ctx.save_for_backward(xc, drop, h, scaled, b)
        return out

    @staticmethod
    def backward(ctx, grad):
        xc, drop, h, a, b = ctx.saved_tensors
        with torch.autocast(xc.device.type, enabled=False):
            g = (grad.to(h.dtype) * 0.5).flatten(0, -2)
            grad_b, grad_h = g.T @ h.flatten(0, -2), g @ b
            xd = xc if drop is None else xc.masked_fill(drop, 0)
            grad_a = (grad_h.T @ xd.flatten(0, -2)).mul_(2.0)
            gx = (grad_h @ a).view(xc.shape)
            gx = gx if drop is None else gx.masked_fill_(drop, 0)
        return gx, grad_a, grad_b, None


def branch_seconds(p: float, seconds: float) -> float:
    """Seconds of one tiny fused-LoRA-shaped branch, forward and backward, added to a linear."""
    x, w = _randn(2, 8, grad=True), _randn(8, 8)
    a, b = _randn(2, 8, grad=True), _randn(8, 2, grad=True)

    def call() -> None:
        (F.linear(x, w) + _BranchProbe.apply(x, a, b, p)).sum().backward()

    plain = _timed(lambda: F.linear(x, w).sum().backward(), seconds / 2)
    return max(_timed(call, seconds / 2) - plain, 0.0)


def pass_rates(hidden: int, tokens: int, seconds: float) -> dict:
    """Bytes/s of an elementwise pass over 64 MB (beyond the caches, as activations are between
    the matmuls that evict them), elements/s of masked_fill, SiLU and dropout-mask drawing over
    a tokens x hidden activation, and the cost of one eager op with autograd."""
    act = torch.randn(tokens, hidden)
    mask = torch.rand(tokens, hidden) < 0.1
    big, big_out = torch.ones(1 << 24), torch.empty(1 << 24)  # 64 MB each
    seed = torch.ones(8, requires_grad=True)

    def chain() -> None:  # 50 multiplications and a sum, forward and backward: ~102 ops
        y = seed
        for _ in range(50):
            y = y * 1.0001
        y.sum().backward()

    cpu = torch.device("cpu")
    with torch.no_grad():
        big_s = _timed(lambda: torch.mul(big, 2.0, out=big_out), seconds / 5)
        mask_s = _timed(lambda: drop_mask(act.shape, 0.1, cpu), seconds / 5)
        fill_s = _timed(lambda: act.masked_fill(mask, 0), seconds / 5)
        silu_s = _timed(lambda: F.silu(act), seconds / 5)
    return {
        "bandwidth": 8 * big.numel() / big_s,
        "mask_rate": act.numel() / mask_s,
        "masked_fill_rate": act.numel() / fill_s,
        "silu_rate": act.numel() / silu_s,
        "op_overhead_s": _timed(chain, seconds / 5) / 102,
    }


def loss_rate(vocab: int, seconds: float) -> float:
    """Logits/s of cross-entropy, forward and backward, over fresh fp32 logits as the step makes
    them: two exp passes, and four logits-sized buffers (the logits, log-softmax, its gradient,
    the zero-filled gradient) each above glibc's 32 MB mmap ceiling, so their pages are faulted
    in anew every step. Those faults, not bandwidth, are most of the cost (profiled: prefix
    tuning's full logits took 10x what a pass at the measured bandwidth predicted)."""
    rows = max(64, -(-LOSS_BYTES // (FP32 * vocab)))
    source = _randn(rows, vocab)
    targets = torch.arange(rows) % vocab

    def run() -> None:
        logits = source.clone().requires_grad_()
        F.cross_entropy(logits, targets, reduction="sum").backward()

    return rows * vocab / _timed(run, seconds)


def measure(
    arch: Architecture,
    tokens: int,
    example: int,
    dtype: torch.dtype,
    seconds: float = 1.5,
    lora: tuple[int, float] | None = None,
    math: bool = True,
) -> Machine:
    """This machine's rates at the model's shapes: GEMMs over `tokens` positions (at most
    1024: the rate is flat beyond), attention over `example`-token examples, passes over a
    tokens x hidden activation; with `lora` (rank, dropout), its branches too."""
    m, n = _bucket(tokens, 64, 1024), _bucket(example, 32, ATTENTION_MAX)
    # The masks and activations drawn here must not move the run's random stream: `train` plans
    # first, so a calibration (but not a cache hit) would change its dropout and data order.
    with torch.random.fork_rng(devices=[]):
        with torch.no_grad():
            gemm = gemm_rates(arch, m, dtype, seconds * 0.4)
            if lora:
                gemm["lora_flops"] = lora_rate(arch, m, lora[0], dtype, seconds * 0.1)
        attention = attention_rates(arch, n, dtype, seconds * 0.25, math)
        passes = pass_rates(arch.hidden, _bucket(tokens, 64, 16384), seconds * 0.2)
        if lora:
            passes["lora_branch_s"] = branch_seconds(lora[1], seconds * 0.05)
        passes["loss_rate"] = loss_rate(arch.vocab, seconds * 0.1)
    return Machine(**gemm, **attention, **passes)


def _bucket(n: int, low: int, high: int) -> int:
    """n rounded up to a power of two within [low, high] (so that the cache stays small)."""
    return 1 << max(low.bit_length() - 1, min(high.bit_length() - 1, (max(n, 1) - 1).bit_length()))


def calibrate(
    arch: Architecture,
    tokens: int,
    example: int,
    dtype: torch.dtype = torch.float32,
    *,
    threads: int | None = None,
    seconds: float = 1.5,
    use_cache: bool = True,
    refresh: bool = False,
    lora: tuple[int, float] | None = None,
    math_attention: bool = True,
) -> Machine:
    """This machine's speeds at the model's shapes with `threads` torch threads (default: as
    now), measured once and cached (`refresh`: measured again now, and the cache updated);
    `lora` (rank, dropout) adds a LoRA method's branches; `math_attention` False times bf16
    attention with SDPA alone (attention_rates)."""
    n = _bucket(example, 32, ATTENTION_MAX)
    sizes = f"m{_bucket(tokens, 64, 1024)}n{n}a{_bucket(tokens, 64, 16384)}"
    before = torch.get_num_threads()
    threads = threads or before
    shape = f"{arch.hidden}x{arch.intermediate}x{arch.heads}x{arch.kv_heads}x{arch.head_dim}"
    sizes += f"r{lora[0]}p{lora[1]}" if lora else ""
    sizes += "" if math_attention else "sdpa"
    key = "|".join([cpu_name(), str(threads), torch.__version__, str(dtype), shape, sizes])
    path = cache_root() / CALIBRATION_FILE
    cached = _read(path) if use_cache else {}
    # An entry another version of this module wrote (a rate more or less) is measured again.
    if key in cached and not refresh and set(cached[key]) == {f.name for f in fields(Machine)}:
        return Machine(**cached[key])
    torch.set_num_threads(threads)
    try:
        machine = measure(arch, tokens, example, dtype, seconds, lora, math_attention)
    finally:
        torch.set_num_threads(before)
    if use_cache:
        cached[key] = asdict(machine)
        write_json_atomic(path, cached)
    return machine


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
