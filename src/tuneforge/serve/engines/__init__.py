"""Engines turn prompt token ids into text: transformers (continuous batching, several adapters),
llama.cpp, and vLLM (a vLLM server behind tuneforge's app).

base.py holds what every engine shares (jobs, events, the batching queue); `open_engine` picks
one for a reference (a run dir, an HF dir, a built-in name or a .gguf file).
"""

from collections.abc import Sequence
from pathlib import Path

from tuneforge.serve.engines.base import (
    Delta,
    Engine,
    Failed,
    Finished,
    Job,
    QueueFull,
    SamplingParams,
)

__all__ = [
    "Delta",
    "Engine",
    "Failed",
    "Finished",
    "Job",
    "QueueFull",
    "SamplingParams",
    "open_engine",
]

ENGINES = ("auto", "transformers", "llama.cpp", "vllm")


def open_engine(
    ref: str,
    *,
    engine: str = "auto",
    adapters: list[tuple[str, str]] | tuple = (),
    name: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    max_batch: int = 8,
    max_batch_tokens: int = 0,
    max_queue: int = 64,
    threads: int | None = None,
    upstream: str | None = None,
    upstream_key: str | None = None,
    vllm_args: Sequence[str] = (),
    vllm_start_timeout_s: float = 600.0,
) -> Engine:
    """The engine for `ref`: llama.cpp for a .gguf (or an export dir holding one), else transformers;
    vllm only when asked for (it starts vLLM on `ref`, or fronts `upstream`)."""
    from tuneforge.errors import ServeError
    from tuneforge.serve.engines.llamacpp import find_gguf

    if engine == "vllm":
        from tuneforge.serve.engines.vllm import VllmEngine

        return VllmEngine.open(
            ref,
            name=name,
            adapters=adapters,
            upstream=upstream,
            upstream_key=upstream_key,
            dtype=dtype,
            device=device,
            max_batch=max_batch,
            max_queue=max_queue,
            vllm_args=vllm_args,
            start_timeout_s=vllm_start_timeout_s,
        )

    gguf = find_gguf(ref) if engine in ("auto", "llama.cpp") else None
    if engine == "llama.cpp" and gguf is None:
        raise ServeError(f"--engine llama.cpp: {ref} is not a .gguf file or a dir holding one")
    if gguf is not None:
        if adapters:
            raise ServeError(
                "--adapter: the llama.cpp engine serves one GGUF file; serve adapters with the "
                "transformers engine on their run dirs"
            )
        from tuneforge.serve.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine.open(gguf, name=name, n_threads=threads, max_queue=max_queue)
    from tuneforge.serve.engines.hf import TransformersEngine

    return TransformersEngine.open(
        ref,
        name=name,
        adapters=[(n, Path(p)) for n, p in adapters],
        dtype=dtype,
        device=device,
        max_batch=max_batch,
        max_batch_tokens=max_batch_tokens,
        max_queue=max_queue,
    )
