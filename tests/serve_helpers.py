"""Helpers for the serving tests: tiny adapter runs, a live uvicorn server on 127.0.0.1 in a thread.

Kept in tests/, never shipped inside the package.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn
from safetensors.torch import load_file, save_file

from tuneforge.cli import main
from tuneforge.loading import load_reference
from tuneforge.serve.app import create_app
from tuneforge.serve.auth import ApiKeys
from tuneforge.serve.limits import Limits
from tuneforge.serve.records import JsonlRecordSink

from helpers import write_run_config, write_toy_messages

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def train_tiny_run(tmp: Path, model_dir: Path, name: str, seed: int = 0, steps: int = 2) -> Path:
    """A finished LoRA run of the tiny model (`steps` steps through the real CLI)."""
    data = write_toy_messages(tmp / f"{name}.jsonl", n=32, seed=seed)
    cfg = write_run_config(
        tmp / f"{name}.yaml",
        model_dir,
        data,
        tmp / name,
        train={"max_steps": steps, "seed": seed},
        eval={"every_steps": 100},
    )
    assert main(["train", str(cfg), "--quiet"]) == 0
    return tmp / name


def perturb_adapter(run_dir: Path, seed: int, scale: float = 2.0) -> None:
    """Give an adapter large random B matrices, so that its answers clearly differ from another's.

    Two steps from a zero-initialised B leave an adapter almost equal to the base; the tests
    that pick adapters by name need them to disagree.
    """
    path = run_dir / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    g = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if "lora_B" in name:
            tensors[name] = torch.randn(t.shape, generator=g, dtype=t.dtype) * scale
    save_file(tensors, str(path))


def two_distinct_runs(tmp: Path, model_dir: Path) -> tuple[Path, Path]:
    """Two tiny LoRA runs, tiny-a and tiny-b, whose adapters answer clearly differently."""
    a = train_tiny_run(tmp, model_dir, "tiny-a", seed=0)
    b = train_tiny_run(tmp, model_dir, "tiny-b", seed=1)
    perturb_adapter(a, seed=1)
    perturb_adapter(b, seed=2)
    return a, b


def reference_models(runs: tuple[Path, Path]) -> dict:
    """The two runs of `two_distinct_runs` loaded for reference answers, as tiny-a and tiny-b."""
    return {
        name: load_reference(run, dtype="fp32")
        for name, run in zip(("tiny-a", "tiny-b"), runs, strict=True)
    }


def keyed_app(engine, records: Path, key: str = KEY, **limits):
    """(app, sink): tuneforge's app in front of `engine` with one API key, JSONL records at
    `records` and the serving tests' limits (64 new tokens, 120 s) unless `limits` says."""
    sink = JsonlRecordSink(records)
    limits = {"max_tokens_cap": 64, "request_timeout_s": 120} | limits
    return create_app(engine, keys=ApiKeys([key]), sink=sink, limits=Limits(**limits)), sink


def chat(client, model: str, prompt: str, **kw):
    """One user turn through the OpenAI client, greedy and 24 tokens unless `kw` says."""
    kw = {"temperature": 0, "max_tokens": 24} | kw
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], **kw
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a thread, for the length of a `with`."""

    def __init__(self, app) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start in 30 s"
            assert self.thread.is_alive(), "the server thread died"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def openai_client(server: LiveServer, key: str = KEY, **kwargs):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60, **kwargs)


def metric_value(text: str, name: str) -> float:
    """The value of one sample line (`name{labels} value`) in Prometheus text."""
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics")
