"""Page latency while a run trains: start `tuneforge ui` on a scratch workspace with a tiny random
model, launch a run through the form, and time GET /runs, /run, /new, /compare and /api/metrics
until the run ends; print p50 / p95 / max per page and the page process's CPU seconds.

Usage: PYTHONPATH=src python bench/ui_latency.py [--steps 400]   (bounded: one run, 127.0.0.1)
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import build_tiny_llama, build_tiny_tokenizer  # noqa: E402
from helpers import write_toy_messages  # noqa: E402

PAGES = [
    "/runs",
    "/run?dir=runs/bench",
    "/new",
    "/compare?runs=runs/bench",
    "/api/metrics?dir=runs/bench",
]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 10 ms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--port", type=int, default=7870)
    args = parser.parse_args()
    ws = Path(tempfile.mkdtemp(prefix="tf-ui-bench-"))
    tok = build_tiny_tokenizer()
    build_tiny_llama(len(tok)).save_pretrained(ws / "models" / "tiny")
    tok.save_pretrained(ws / "models" / "tiny")
    (ws / "data").mkdir()
    write_toy_messages(ws / "data" / "train.jsonl", n=64)
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tuneforge.cli",
            "ui",
            "--workspace",
            str(ws),
            "--port",
            str(args.port),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        while url is None:
            found = re.search(r"open (\S+)", ui.stdout.readline())
            url = found.group(1) if found else None
        base = url.split("/?")[0]
        client = httpx.Client(base_url=base, timeout=30)
        for _ in range(100):
            try:
                client.get(url)
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        csrf = re.search(r'name="csrf" content="([^"]+)"', client.get("/new").text).group(1)
        form = {
            "_csrf": csrf,
            "method.name": "lora",
            "model.name": "models/tiny",
            "model.dtype": "fp32",
            "data.train": "data/train.jsonl",
            "data.max_length": "64",
            "train.batch_size": "4",
            "train.max_steps": str(args.steps),
            "eval.every_steps": "100",
            "train.num_threads": "1",
            "output.dir": "runs/bench",
            "action": "launch",
        }
        client.post("/new", data=form)
        metrics = ws / "runs" / "bench" / "metrics.jsonl"
        while not metrics.is_file():
            time.sleep(0.5)
        cpu0, t0 = cpu_seconds(ui.pid), time.monotonic()
        times: dict[str, list[float]] = {page: [] for page in PAGES}
        while not (ws / "runs" / "bench" / "summary.json").is_file():
            for page in PAGES:
                start = time.perf_counter()
                assert client.get(page).status_code == 200, page
                times[page].append(time.perf_counter() - start)
            time.sleep(0.5)
        cpu, wall = cpu_seconds(ui.pid) - cpu0, time.monotonic() - t0
        lines = metrics.read_text().count("\n")
        print(f"while the run trained ({wall:.0f} s, {lines} metrics lines):")
        for page, values in times.items():
            values.sort()
            p95 = values[int(0.95 * (len(values) - 1))]
            print(
                f"  {page:34} n={len(values):3}  p50 {statistics.median(values) * 1000:6.1f} ms"
                f"  p95 {p95 * 1000:6.1f} ms  max {values[-1] * 1000:6.1f} ms"
            )
        print(
            f"page process CPU: {cpu:.1f} s over {wall:.0f} s wall (serving these requests included)"
        )
    finally:
        ui.terminate()
        ui.wait(timeout=20)
        shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
