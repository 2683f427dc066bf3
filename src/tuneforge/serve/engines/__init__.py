"""Engines turn prompt token ids into text: transformers (batched, several adapters) and llama.cpp.

base.py holds what every engine shares (jobs, events, the batching queue); `open_engine` picks
one for a reference (a run dir, an HF dir, a built-in name or a .gguf file).
"""

from tuneforge.serve.engines.base import (
    Delta,
    Engine,
    Failed,
    Finished,
    Job,
    QueueFull,
    SamplingParams,
)

__all__ = ["Delta", "Engine", "Failed", "Finished", "Job", "QueueFull", "SamplingParams"]
