"""Score one artefact in a fresh process: load time, peak RSS, token log-probs, greedy tokens/s,
and greedy answers to the held-out prompts of generation data.

Run as `python -m tuneforge.export.probe KIND PATH EVALSET OUT` (one process per artefact, so
that peak RSS is the artefact's own). GGUF files run through llama.cpp itself; metrics are
computed from the raw scores by recheck.py.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.export.evalset import EvalSet
from tuneforge.heap import peak_rss_bytes

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

    def continue_from(self, prefix_len: int, ids: list[int]) -> np.ndarray:
        """Logits of `ids` read after the first `prefix_len` tokens of the last `logits` call
        (llama.cpp drops the KV cache past n_tokens before it evaluates)."""
        self.llm.n_tokens = prefix_len
        self.llm.eval(ids)
        return np.array(self.llm.scores[prefix_len : prefix_len + len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], n: int, stop: frozenset[int] = frozenset()) -> list[int]:
        """Up to n tokens, ending before the first id in `stop`."""
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(n):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if token in stop:
                break
            out.append(token)
            self.llm.eval([token])
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
            out = self.model(input_ids=self.torch.tensor([ids]), use_cache=True)
        self._cache, self._cached = out.cache, len(ids)
        return out.logits[0].float().numpy()

    def continue_from(self, prefix_len: int, ids: list[int]) -> np.ndarray:
        """Logits of `ids` read after the first `prefix_len` tokens of the last `logits` call:
        the KV cache is cut back to the prefix (a negative crop: tokens removed) and extended."""
        if self._cached > prefix_len:
            self._cache.crop(prefix_len - self._cached)
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.tensor([ids]), cache=self._cache, use_cache=True)
        self._cache, self._cached = out.cache, prefix_len + len(ids)
        return out.logits[0].float().numpy()

    def greedy(self, ids: list[int], n: int, stop: frozenset[int] = frozenset()) -> list[int]:
        """Up to n tokens (ending before the first id in `stop`), one forward per token over the
        KV cache, as llama.cpp decodes."""
        torch = self.torch
        out: list[int] = []
        with torch.no_grad():
            step = self.model(input_ids=torch.tensor([ids]), use_cache=True)
            for _ in range(n):
                token = int(step.logits[0, -1].argmax())
                if token in stop:
                    break
                out.append(token)
                step = self.model(
                    input_ids=torch.tensor([[token]]),
                    cache=step.cache,
                    use_cache=True,
                )
        return out


def _picked(logits: np.ndarray, targets: list[int]) -> np.ndarray:
    """log p(targets[i]) under logits row i."""
    return _log_softmax_rows(logits)[np.arange(len(targets)), targets]


def token_logprobs(logits: np.ndarray, ids: list[int], scored: list[bool]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t = 1 .. len(ids) - 1 where `scored[t]`, else 0.0 (the loss
    reads scored positions only, so the softmax runs on those rows alone)."""
    out = np.zeros(len(ids) - 1)
    rows = [t - 1 for t in range(1, len(ids)) if scored[t]]
    if rows:
        out[rows] = _picked(logits[rows], [ids[t + 1] for t in rows])
    return out.tolist()


def answer_scores(backend: Any, logits: np.ndarray, ids: list[int], prompt: list[int], answers):
    """Per label: summed log-probability of its answer after `prompt`. The first answer token is
    read from the prompt's last row, the rest continue the prompt's KV cache — reused from the
    example's own forward (`logits` of `ids`) when it starts with the prompt."""
    n = len(prompt)
    if ids[:n] != prompt:
        logits = backend.logits(prompt)
    first = _log_softmax_rows(logits[n - 1 : n])[0]
    row = []
    for answer in answers:
        score = float(first[answer[0]])
        if len(answer) > 1:
            score += float(_picked(backend.continue_from(n, answer[:-1]), answer[1:]).sum())
        row.append(score)
    return row


def score_examples(backend: Any, evalset: EvalSet) -> tuple[list[list[float]], list[list[float]]]:
    """(token log-probs of each example, answer scores of each example per label), one forward
    of each example plus short continuations for the labels."""
    logprobs, scores = [], []
    for i, ids in enumerate(evalset.sequences):
        logits = backend.logits(ids)
        logprobs.append(token_logprobs(logits, ids, evalset.loss_masks[i]))
        if evalset.labels:
            scores.append(answer_scores(backend, logits, ids, evalset.prompts[i], evalset.answers))
    return logprobs, scores


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
    return peak_rss_bytes() / 2**20


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
    out["logprobs"], out["answer_scores"] = score_examples(backend, evalset)
    stop = frozenset(evalset.gen_stop)
    out["generations"] = [
        backend.greedy(prompt, evalset.gen_max_tokens, stop) for prompt in evalset.gen_prompts
    ]
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
