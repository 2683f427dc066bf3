"""The synthesize recipe (`tuneforge synthesize`): a model (a run dir or a base) writes new rows
from few-shot seeds, self-instruct style, and the filters of augment/synth.py keep the good ones.

Instruction rows: the model writes a new task, then answers it (greedy). Classification rows: it
writes a new input for a given label. Every row records its provenance. Batched, seeded sampling.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tuneforge.augment.synth import (
    Filters,
    Messages,
    Seed,
    SynthSettings,
    synthesize_candidates,
)
from tuneforge.augment.text import detect_language
from tuneforge.data.formats import load_examples, write_jsonl
from tuneforge.data.templates import render_prompt
from tuneforge.errors import DataError, UsageError
from tuneforge.evaluation.generation import cut_at_stop, end_of_turn_ids, left_pad
from tuneforge.loading import load_reference
from tuneforge.paths import write_json_atomic

log = logging.getLogger("tuneforge")


@dataclass
class SynthJob:
    model: str
    seed_data: str
    n: int
    out: Path
    labels: list[str] | None = None  # classification: the labels to write inputs for
    existing: str | None = None  # more rows new ones must not resemble
    shots: int = 4
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 128
    answer_max_new_tokens: int = 256
    batch_size: int = 8
    seed: int = 0
    max_similarity: float = 0.7
    min_chars: int = 5
    max_chars: int = 1000
    lang: str = "auto"  # auto (the seeds' language), zh, en, or any (no check)
    dtype: str = "auto"


class Sampler:
    """Batched sampling from a loaded model; each batch is seeded by (seed, batch number)."""

    def __init__(self, loaded, stop_ids: set[int], seed: int) -> None:
        self.model, self.tok, self.stop_ids, self.seed = (
            loaded.model,
            loaded.tokenizer,
            stop_ids,
            seed,
        )
        self.calls = 0

    @torch.no_grad()
    def __call__(
        self, prompts: list[Messages], *, sample: dict[str, Any], max_new_tokens: int
    ) -> list[str]:
        ids, mask = left_pad([render_prompt(self.tok, m) for m in prompts], self.tok.pad_token_id)
        device = next(self.model.parameters()).device
        torch.manual_seed(self.seed * 100003 + self.calls)
        self.calls += 1
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(self.stop_ids),
            pad_token_id=self.tok.pad_token_id,
            **sample,
        )
        new = out[:, ids.shape[1] :].tolist()
        return [
            self.tok.decode(cut_at_stop(r, self.stop_ids), skip_special_tokens=True) for r in new
        ]


def run_synthesis(job: SynthJob, show_progress: bool = True) -> dict[str, Any]:
    """Generate, filter and write the rows; returns the counts (also written beside the output)."""
    _check_job(job)
    loaded_seeds = load_examples(job.seed_data, "auto", "fail")
    seeds = _seeds(loaded_seeds.examples, job.seed_data)
    labels = _labels(job, seeds)
    lang = _language(job, seeds)
    existing = [s.prompt for s in seeds]
    if job.existing:
        existing += [s.prompt for s in _seeds(load_examples(job.existing).examples, job.existing)]
    loaded = load_reference(job.model, job.dtype)
    sampler = Sampler(loaded, end_of_turn_ids(loaded.tokenizer, loaded_seeds.examples), job.seed)
    filters = Filters(
        existing,
        set(labels) if labels else None,
        None if lang == "any" else lang,
        job.min_chars,
        job.max_chars,
        job.max_similarity,
    )
    sample = {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p}
    bar = tqdm(total=job.n, desc="synthesize", unit="row", disable=not show_progress)
    start = time.perf_counter()
    kept, made = synthesize_candidates(
        seeds,
        lambda prompts: sampler(prompts, sample=sample, max_new_tokens=job.max_new_tokens),
        filters,
        SynthSettings(job.n, job.shots, job.batch_size, job.seed),
        labels,
        on_batch=lambda made, n_kept: bar.update(n_kept - bar.n),
    )
    rows = _rows(job, kept, labels, sampler, loaded_seeds.format, filters.rejected)
    elapsed = time.perf_counter() - start
    bar.close()
    stats = {
        "generated": made,
        "kept": len(rows),
        "kept_share": round(len(rows) / max(made, 1), 4),
        "rejected": dict(sorted(filters.rejected.items())),
        "seconds": round(elapsed, 2),
        "generated_rows_per_s": round(made / max(elapsed, 1e-9), 3),
        "job": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(job).items()},
    }
    if not rows:
        raise DataError(
            f"synthesize: none of {made} generated rows passed the filters "
            f"(rejected: {stats['rejected']}); nothing written"
        )
    write_jsonl(job.out, rows)
    write_json_atomic(job.out.with_suffix(".stats.json"), stats)
    return stats


def _check_job(job: SynthJob) -> None:
    if job.out.suffix.lower() != ".jsonl":
        raise UsageError(f"--out {job.out}: write a .jsonl file")
    if job.out.resolve() == Path(job.seed_data).resolve():
        raise UsageError(f"--out {job.out}: is the seed file; choose another path")
    for name in ("n", "shots", "batch_size", "max_new_tokens"):
        if getattr(job, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be at least 1")
    if not 0.0 < job.max_similarity <= 1.0:
        raise UsageError("--similarity: must be in (0, 1]")
    if job.lang not in ("auto", "zh", "en", "any"):
        raise UsageError(f"--lang {job.lang!r}: one of auto, zh, en, any")


def _seeds(examples, path: str) -> list[Seed]:
    seeds = []
    for ex in examples:
        users = [m["content"] for m in ex.messages if m["role"] == "user"]
        if not users:
            raise DataError(f"{ex.source}: a seed row needs a prompt (a user turn or instruction)")
        seeds.append(Seed(users[-1], ex.label, ex.source))
    if not seeds:
        raise DataError(f"{path}: the file has no rows")
    return seeds


def _labels(job: SynthJob, seeds: list[Seed]) -> list[str] | None:
    known = sorted({s.label for s in seeds if s.label is not None})
    if not known:
        if job.labels:
            raise UsageError(f"--labels: the seed rows of {job.seed_data} have no labels")
        return None
    unlabelled = next((s for s in seeds if s.label is None), None)
    if unlabelled is not None:
        raise DataError(f"{unlabelled.source}: this seed row has no label while others have one")
    chosen = job.labels or known
    unknown = [label for label in chosen if label not in known]
    if unknown:
        raise UsageError(f"--labels: {unknown[0]!r} is no label of the seeds ({', '.join(known)})")
    return chosen


def _language(job: SynthJob, seeds: list[Seed]) -> str:
    if job.lang != "auto":
        return job.lang
    found = Counter(detect_language(s.prompt) for s in seeds)
    return found.most_common(1)[0][0] or "any"


def _rows(job, kept, labels, sampler, fmt: str, rejected: Counter) -> list[dict[str, Any]]:
    """Output rows in the seeds' shape, each with its provenance; instruction rows get answers."""
    sampling = {"temperature": job.temperature, "top_p": job.top_p, "seed": job.seed}
    sampling["max_new_tokens"] = job.max_new_tokens
    answers: list[str | None] = [None] * len(kept)
    if not labels:
        prompts = [[{"role": "user", "content": c.text}] for c in kept]
        for i in range(0, len(prompts), job.batch_size):
            batch = prompts[i : i + job.batch_size]
            got = sampler(
                batch, sample={"do_sample": False}, max_new_tokens=job.answer_max_new_tokens
            )
            answers[i : i + len(batch)] = [a.strip() for a in got]
    rows = []
    for c, answer in zip(kept, answers, strict=True):
        provenance = {
            "generator": "tuneforge synthesize",
            "model": job.model,
            "seeds": c.seeds,
            "sampling": sampling,
            "answer": "greedy" if answer is not None else None,
        }
        if labels and fmt == "classification":
            rows.append({"text": c.text, "label": c.label, "provenance": provenance})
            continue
        if answer is not None and not answer:
            rejected["empty_answer"] += 1
            continue
        reply = c.label if labels else answer
        row: dict[str, Any] = {
            "messages": [
                {"role": "user", "content": c.text},
                {"role": "assistant", "content": reply},
            ]
        }
        if labels:
            row["label"] = c.label
        rows.append({**row, "provenance": provenance})
    return rows
