"""Measure this machine for the plan: matmul speed at the model's shapes and memory bandwidth,
a few seconds once, cached per CPU, thread count, torch version and shape under the cache dir;
also this process's resident memory and the memory still available.

The arithmetic that uses these numbers is train/estimate.py; nothing here knows about models.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from tuneforge.models import cache_root
from tuneforge.paths import write_json_atomic
from tuneforge.train.estimate import Machine

CALIBRATION_FILE = "calibration.json"


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


def _cpu_name() -> str:
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


def measure(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 1.0) -> Machine:
    """Matmul FLOP/s of (m x k) @ (k x n) and its backward-shaped twin, and copy bandwidth."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    g = torch.randn(m, n, generator=gen).to(dtype)
    forward = _timed(lambda: a @ b, seconds / 3)
    backward = _timed(lambda: g.T @ a, seconds / 3)  # a weight gradient's shape
    flops = 2 * m * k * n / ((forward + backward) / 2)
    x, y = torch.ones(1 << 24), torch.empty(1 << 24)  # 64 MB each: out of cache, no page faults
    copy = _timed(lambda: torch.mul(x, 2.0, out=y), seconds / 3)
    return Machine(matmul_flops=flops, bandwidth=2 * x.numel() * 4 / copy)


def calibrate(
    hidden: int,
    intermediate: int,
    tokens: int,
    dtype: torch.dtype = torch.float32,
    *,
    seconds: float = 1.5,
    use_cache: bool = True,
    refresh: bool = False,
) -> Machine:
    """This machine's speeds at the model's shapes, measured once and cached (`refresh`:
    measured again now, and the cache updated)."""
    m = 1 << max(6, min(11, (max(tokens, 1) - 1).bit_length()))  # tokens, a power of 2 in 64..2048
    key = "|".join(
        [_cpu_name(), str(torch.get_num_threads()), torch.__version__, str(dtype)]
        + [f"{m}x{hidden}x{intermediate}"]
    )
    path = cache_root() / CALIBRATION_FILE
    cached = _read(path) if use_cache else {}
    if key in cached and not refresh:
        return Machine(**cached[key])
    machine = measure(m, hidden, intermediate, dtype, seconds)
    if use_cache:
        cached[key] = {"matmul_flops": machine.matmul_flops, "bandwidth": machine.bandwidth}
        write_json_atomic(path, cached)
    return machine


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
