"""The re-check's evaluation set as plain token ids, rendered once with the run's tokenizer.

Every artefact (torch or llama.cpp) is scored on exactly these ids, so differences come from the
weights alone; scoring is probe.py's job and turning scores into metrics is recheck.py's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tuneforge.constants import IGNORE_INDEX
from tuneforge.data.formats import Example
from tuneforge.data.templates import render, render_prompt
from tuneforge.errors import DataError
from tuneforge.export.chatformat import stop_ids

#: A fixed prompt for the generation speed probe and greedy agreement.
PROBE_PROMPT = "Write three short sentences about the sea."
#: Generation data: how many held-out prompts each artefact answers greedily for BLEU/chrF/ROUGE,
#: and the most new tokens per answer (the longest reference answer + 8, capped here).
GEN_ROWS = 32
GEN_MAX_TOKENS = 128


@dataclass
class EvalSet:
    sequences: list[list[int]]  # one rendered example each
    loss_masks: list[list[bool]]  # True where position t is a scored target token
    labels: list[str] = field(default_factory=list)  # classification label set, or empty
    prompts: list[list[int]] = field(default_factory=list)  # per example, before the answer
    answers: list[list[int]] = field(default_factory=list)  # per label, the answer's ids
    refs: list[str] = field(default_factory=list)  # per example, its reference label
    gen_prompt: list[int] = field(default_factory=list)
    tokenizer_probe: list[tuple[str, list[int]]] = field(default_factory=list)
    gen_prompts: list[list[int]] = field(default_factory=list)  # generation data: prompts
    gen_refs: list[str] = field(default_factory=list)  # their reference answers
    gen_stop: list[int] = field(default_factory=list)  # ids that end an answer
    gen_max_tokens: int = 0
    source: str = ""

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> EvalSet:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["tokenizer_probe"] = [tuple(p) for p in data["tokenizer_probe"]]
        return cls(**data)


def _with_answer(example: Example, answer: str) -> Example:
    messages = list(example.messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return replace(example, messages=[*messages, {"role": "assistant", "content": answer}])


def _prompt_and_answer(tokenizer: Any, example: Example) -> tuple[list[int], list[int]]:
    ids, labels = render(tokenizer, example)
    scored = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    return ids[: scored[0]], ids[scored[0] : scored[-1] + 1]


def _label_choices(tokenizer: Any, examples: list[Example], labels: list[str]):
    """(prompts, answers): each example's prompt, and each label's answer ids after it."""
    prompts, answers = [], None
    for ex in examples:
        split = [_prompt_and_answer(tokenizer, _with_answer(ex, label)) for label in labels]
        if len({tuple(p) for p, _ in split}) != 1:
            raise DataError(
                f"{ex.source}: the chat template renders the prompt differently per label"
            )
        tails = [a for _, a in split]
        if answers is not None and tails != answers:
            raise DataError(f"{ex.source}: the labels tokenise differently after this prompt")
        prompts.append(split[0][0])
        answers = tails
    return prompts, answers or []


def _generation_rows(tokenizer: Any, examples: list[Example], max_length: int):
    """(prompts, reference answers, longest answer in tokens) of up to GEN_ROWS chat examples."""
    prompts, refs, longest = [], [], 0
    for ex in examples:
        if len(prompts) == GEN_ROWS:
            break
        last = ex.messages[-1] if ex.messages else None
        if last is None or last["role"] != "assistant":
            continue
        prompt, answer = _prompt_and_answer(tokenizer, ex)
        if prompt and len(prompt) <= max_length:
            prompts.append(prompt)
            refs.append(last["content"])
            longest = max(longest, len(answer))
    return prompts, refs, longest


def is_classification(examples: list[Example], asked: bool) -> bool:
    """Label metrics apply to classification rows, or when the run asked for accuracy."""
    return any(ex.label is not None for ex in examples) or asked


def build_eval_set(
    tokenizer: Any,
    examples: list[Example],
    *,
    classification: bool,
    max_length: int,
    source: str,
) -> EvalSet:
    """Render `examples` (truncated to `max_length` tokens) into an EvalSet."""
    if not examples:
        raise DataError(f"{source}: no held-out examples to re-check the export on")
    sequences, masks = [], []
    for ex in examples:
        ids, labels = render(tokenizer, ex)
        ids, labels = ids[:max_length], labels[:max_length]
        sequences.append(ids)
        masks.append([lab != IGNORE_INDEX for lab in labels])
    out = EvalSet(sequences, masks, source=source)
    if classification:
        refs = [ex.label if ex.label is not None else ex.messages[-1]["content"] for ex in examples]
        out.labels = sorted(set(refs))
        if len(out.labels) < 2:
            raise DataError(f"{source}: accuracy needs at least two distinct labels")
        out.refs = refs
        out.prompts, out.answers = _label_choices(tokenizer, examples, out.labels)
    else:
        out.gen_prompts, out.gen_refs, longest = _generation_rows(tokenizer, examples, max_length)
        out.gen_stop = stop_ids(tokenizer)
        out.gen_max_tokens = min(longest + 8, GEN_MAX_TOKENS)
    chat = getattr(tokenizer, "chat_template", None)
    probe = [{"role": "user", "content": PROBE_PROMPT}]
    out.gen_prompt = (
        render_prompt(tokenizer, probe) if chat else tokenizer(PROBE_PROMPT)["input_ids"]
    )
    texts = [tokenizer.decode(seq) for seq in sequences[:16]]
    out.tokenizer_probe = [
        (t, list(tokenizer(t, add_special_tokens=False)["input_ids"])) for t in texts
    ]
    return out
