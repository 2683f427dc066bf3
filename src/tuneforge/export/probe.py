"""Score one artefact in a fresh process: load time, peak RSS, token log-probs, greedy tokens/s.

Run as `python -m tuneforge.export.probe KIND PATH EVALSET OUT` (one process per artefact, so
that peak RSS is the artefact's own). GGUF files run through llama.cpp itself; metrics are
computed from the raw scores by recheck.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.export.evalset import EvalSet

KINDS = ("run", "hf", "nf4", "gguf")


def _log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


class LlamaCppBackend:
    """A GGUF file through llama-cpp-python (its logits, its decoding)."""

    def __init__(self, path: str, n_ctx: int, threads: int, lora: str | None = None) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            path,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=True,
            n_threads=threads,
            n_threads_batch=threads,
            lora_path=lora,
            verbose=False,
        )

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(n):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([out[-1]])
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


class TorchBackend:
    """A run directory (base + adapter), a plain HF directory, or an NF4 bitsandbytes directory."""

    def __init__(self, kind: str, path: str, dtype: str, threads: int) -> None:
        import torch

        from tuneforge.models import load_model, resolve_dtype

        torch.set_num_threads(threads)
        self.torch = torch
        torch_dtype = resolve_dtype(dtype)
        if kind == "run":
            from tuneforge.loading import load_run

            self.model = load_run(path, torch_dtype).model
        elif kind == "nf4":
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
        else:
            self.model = load_model(path, torch_dtype)
        self.model.eval()

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.tensor([ids]))
        return out.logits[0].float().numpy()

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """n tokens, no early stop, one forward per token over the KV cache (as llama.cpp)."""
        torch = self.torch
        out: list[int] = []
        with torch.no_grad():
            step = self.model(input_ids=torch.tensor([ids]), use_cache=True)
            for _ in range(n):
                out.append(int(step.logits[0, -1].argmax()))
                step = self.model(
                    input_ids=torch.tensor([[out[-1]]]),
                    past_key_values=step.past_key_values,
                    use_cache=True,
                )
        return out


def token_logprobs(backend: Any, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t = 1 .. len(ids) - 1."""
    logp = _log_softmax_rows(backend.logits(ids)[:-1])
    return logp[np.arange(len(ids) - 1), ids[1:]].tolist()


def answer_scores(backend: Any, evalset: EvalSet) -> list[list[float]]:
    """Per example, per label: summed log-probability of the label's answer after the prompt."""
    scores = []
    for prompt in evalset.prompts:
        row = []
        for answer in evalset.answers:
            logp = token_logprobs(backend, prompt + answer)
            row.append(float(sum(logp[len(prompt) - 1 :])))
        scores.append(row)
    return scores


def import_runtime(kind: str) -> None:
    """Import the runtime before the load clock starts: load_s is the artefact's own time."""
    if kind == "gguf":
        import llama_cpp  # noqa: F401
    else:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401


def peak_rss_mb() -> float:
    """This process's peak resident memory since exec (VmHWM; ru_maxrss would include the
    parent's memory at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_backend(kind: str, path: str, args: argparse.Namespace) -> Any:
    if kind == "gguf":
        return LlamaCppBackend(path, args.n_ctx, args.threads, args.lora)
    return TorchBackend(kind, path, args.dtype, args.threads)


def run_probe(args: argparse.Namespace) -> dict[str, Any]:
    evalset = EvalSet.load(Path(args.evalset))
    import_runtime(args.kind)
    start = time.perf_counter()
    backend = load_backend(args.kind, args.path, args)
    out: dict[str, Any] = {"load_s": time.perf_counter() - start}
    out["logprobs"] = [token_logprobs(backend, ids) for ids in evalset.sequences]
    out["answer_scores"] = answer_scores(backend, evalset) if evalset.labels else []
    start = time.perf_counter()
    out["greedy"] = backend.greedy(evalset.gen_prompt, args.new_tokens)
    out["gen_s"] = time.perf_counter() - start
    if isinstance(backend, LlamaCppBackend):
        out["tokenizer_matches"] = [
            backend.tokenize(t) == ids for t, ids in evalset.tokenizer_probe
        ]
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tuneforge.export.probe")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("path")
    p.add_argument("evalset")
    p.add_argument("out")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0))))
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--lora", help="a GGUF LoRA adapter applied over the GGUF model")
    args = p.parse_args(argv)
    Path(args.out).write_text(json.dumps(run_probe(args)), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
