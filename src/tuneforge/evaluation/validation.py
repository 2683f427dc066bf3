"""Metrics beyond loss: scores of greedy generations, label accuracy (the label named in the
generated text, or the most likely label) and sample generations; during training and for
`tuneforge eval` on a file.

Loss and perplexity stay with the training loop; when to evaluate and where to log is the recipe's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tuneforge.constants import GENERATION_METRICS as TEXT_METRICS
from tuneforge.constants import IGNORE_INDEX, LABEL_METRICS
from tuneforge.data.pipeline import TokenizedExample, collate
from tuneforge.data.templates import cut_at_text, end_of_turn
from tuneforge.errors import ConfigError, DataError
from tuneforge.evaluation.generation import (
    GenItem,
    end_of_turn_ids,
    generate_answers,
    generate_batched,
    items_from_examples,
    items_from_tokenized,
    last_labelled_run,
)
from tuneforge.evaluation.lang import check_lang, detect_lang
from tuneforge.evaluation.metrics import classification_report, match_label
from tuneforge.evaluation.progress import Progress
from tuneforge.evaluation.score import META_KEY, score_texts
from tuneforge.loading import answer_text
from tuneforge.train.rundir import SAMPLES_FILE

MAX_LABELS = 50


def score_generations(
    preds: Sequence[str],
    refs: Sequence[str],
    metrics: Sequence[str],
    labels: Sequence[str] = (),
    lang: str = "en",
    zh_mode: str = "word",
) -> dict[str, Any]:
    """Text metrics of `preds` against `refs` (0-100), plus accuracy / macro-F1 of the label
    each prediction names (match_label) when `labels` are given; "meta" holds the signatures."""
    out: dict[str, Any] = {}
    text = [m for m in metrics if m in TEXT_METRICS]
    if text:
        out.update(score_texts(preds, refs, text, lang=lang, zh_mode=zh_mode))
    if labels:
        matched = [match_label(p, labels) for p in preds]
        out.update(classification_report(matched, refs, labels))
    return out


def score_file_generations(
    model,
    tokenizer: Any,
    path: str,
    metrics: Sequence[str],
    batch_size: int = 8,
    limit: int | None = None,
    *,
    max_new_tokens: int = 64,
    lang: str = "auto",
    zh_mode: str = "word",
    progress: Progress = False,
) -> dict[str, Any]:
    """Text metrics of greedy answers to every prompt of a data file (`tuneforge eval`)."""
    from tuneforge.data.formats import load_examples

    examples = load_examples(path, "auto", on_bad_row="fail").examples[:limit]
    items = items_from_examples(examples, tokenizer)
    if not items:
        raise DataError(f"{path}: no row has a prompt and an answer to generate")
    stop_ids = end_of_turn_ids(tokenizer, examples[:16])
    preds = generate_answers(
        model,
        tokenizer,
        items,
        stop_ids=stop_ids,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    refs = [item.reference for item in items]
    lang = check_lang(lang) if lang != "auto" else detect_lang(refs)
    return score_generations(preds, refs, metrics, lang=lang, zh_mode=zh_mode)


def check_label_set(labels: Sequence[str], where: str = "eval.metrics") -> None:
    """Accuracy compares answers against a small label set; refuse free-text references."""
    if not 2 <= len(labels) <= MAX_LABELS:
        raise ConfigError(
            f"{where}: accuracy needs classification-like validation data (2 to {MAX_LABELS} "
            f"distinct answers), found {len(labels)} distinct answers"
        )


def sharded(accelerator: Any, n: int, work: Callable[[list[int]], list[Any]]) -> list[Any]:
    """Run `work` on this process's share of range(n) and return all results in index order."""
    world, rank = getattr(accelerator, "num_processes", 1), getattr(accelerator, "process_index", 0)
    mine = list(range(rank, n, world))
    results = work(mine)
    if world == 1:
        return results
    from accelerate.utils import gather_object

    pairs = gather_object(list(zip(mine, results, strict=True)))
    return [value for _, value in sorted(pairs, key=lambda pair: pair[0])]


class ValidationScorer:
    """Generation and label metrics on the validation set, computed batch by batch.

    Memory stays flat in the size of the set: generation keeps only answer ids per batch, and
    label scoring keeps one log-likelihood per (row, label), never the logits.
    """

    def __init__(
        self,
        tokenizer: Any,
        validation: Sequence[TokenizedExample],
        metrics: Sequence[str],
        *,
        generate: bool,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        max_examples: int | None = None,
        num_samples: int = 4,
        lang: str = "auto",
        zh_mode: str = "word",
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.tokenizer, self.generate, self.batch_size = tokenizer, generate, batch_size
        self.max_new_tokens, self.num_samples = max_new_tokens, num_samples
        self.zh_mode, self.autocast_dtype = zh_mode, autocast_dtype
        self.metrics = list(metrics)
        wants_labels = any(m in LABEL_METRICS for m in metrics)
        rows = list(validation[:max_examples] if max_examples else validation)
        self.items, self.stop_ids = items_from_tokenized(rows, tokenizer)
        self.stop_texts = end_of_turn(tokenizer).texts
        if (generate or wants_labels) and not self.items:
            raise ConfigError(
                "eval.generate / eval.metrics: no validation row has a prompt and an answer "
                "(plain-text rows, or data.train_on: all); use loss only"
            )
        refs = [item.reference for item in self.items]
        self.lang = check_lang(lang) if lang != "auto" else detect_lang(refs)
        self.labels = sorted(set(refs)) if wants_labels else []
        if wants_labels:
            check_label_set(self.labels)
        # Label scoring without generation: each label's answer tokens as training saw them.
        self.answer_ids = _answer_ids(rows, self.labels, tokenizer) if wants_labels else {}

    @property
    def active(self) -> bool:
        return self.generate or bool(self.labels)

    def __call__(self, model, accelerator) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(metrics named eval_*, sample generations) for the model as it is now."""
        refs = [item.reference for item in self.items]
        if self.generate:
            preds = sharded(accelerator, len(self.items), lambda idx: self._generate(model, idx))
            scores = score_generations(
                preds, refs, self.metrics, self.labels, self.lang, self.zh_mode
            )
            samples = [
                {
                    "source": item.source,
                    "prompt": self.tokenizer.decode(item.prompt_ids, skip_special_tokens=True),
                    "prediction": pred,
                    "reference": item.reference,
                }
                for item, pred in list(zip(self.items, preds, strict=True))[: self.num_samples]
            ]
        else:
            preds = sharded(accelerator, len(self.items), lambda idx: self._pick(model, idx))
            scores, samples = classification_report(preds, refs, self.labels), []
        meta = scores.pop(META_KEY, None)
        out = {f"eval_{name}": value for name, value in scores.items()}
        if meta is not None:
            out["eval_lang"] = meta["lang"]
            if meta["signatures"]:
                out["eval_signatures"] = meta["signatures"]
        return out, samples

    def _generate(self, model, idx: list[int]) -> list[str]:
        answers = generate_batched(
            model,
            [self.items[i].prompt_ids for i in idx],
            pad_id=self.tokenizer.pad_token_id,
            stop_ids=self.stop_ids,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            autocast_dtype=self.autocast_dtype,
            stop_texts=self.stop_texts,
            tokenizer=self.tokenizer,
        )
        return [
            answer_text(self.tokenizer, a, self.stop_ids, self.stop_texts).strip() for a in answers
        ]

    @torch.no_grad()
    def _pick(self, model, idx: list[int]) -> list[str]:
        """The label whose answer tokens are most likely after each prompt."""
        from tuneforge.evaluation.runner import sequence_logprobs

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        rows = [
            _scored_row(self.items[i], self.answer_ids[label]) for i in idx for label in self.labels
        ]
        width = self.batch_size * len(self.labels)
        scores: list[float] = []
        try:
            for start in range(0, len(rows), width):
                batch = collate(rows[start : start + width], pad_id=self.tokenizer.pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                with _autocast(device, self.autocast_dtype):
                    logp, _ = sequence_logprobs(model, batch)
                scores.extend(logp.float().tolist())
        finally:
            model.train(was_training)
        k = len(self.labels)
        return [
            self.labels[max(range(k), key=scores[n * k : (n + 1) * k].__getitem__)]
            for n in range(len(idx))
        ]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    from contextlib import nullcontext

    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def _answer_ids(
    rows: Sequence[TokenizedExample], labels: Sequence[str], tokenizer: Any
) -> dict[str, list[int]]:
    """For each label, the token ids of an assistant turn answering it (end-of-turn included)."""
    found: dict[str, list[int]] = {}
    texts = end_of_turn(tokenizer).texts
    for row in rows:
        start, end = last_labelled_run(row.labels) or (0, 0)
        text = tokenizer.decode(row.input_ids[start:end], skip_special_tokens=True)
        text = cut_at_text(text, texts).strip()
        if start and text in labels and text not in found:
            found[text] = list(row.input_ids[start:end])
    return found


def _scored_row(item: GenItem, answer: list[int]) -> TokenizedExample:
    prompt = item.prompt_ids
    return TokenizedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, item.source)


def reset_samples(run_dir: str | Path) -> None:
    """Start a fresh samples.jsonl (an overwritten run directory may hold an old one)."""
    (Path(run_dir) / SAMPLES_FILE).unlink(missing_ok=True)


def append_samples(run_dir: str | Path, step: int, samples: Sequence[dict[str, Any]]) -> None:
    """Add one evaluation's sample generations to RUN_DIR/samples.jsonl (one line per sample)."""
    if not samples:
        return
    with (Path(run_dir) / SAMPLES_FILE).open("a", encoding="utf-8") as fh:
        for sample in samples:
            fh.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")
