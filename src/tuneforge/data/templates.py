"""Render examples with a chat template into input_ids and labels (loss on assistant turns only).

Leaves reading files to formats.py, and truncation, splitting and batching to pipeline.py.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import jinja2

from tuneforge.constants import IGNORE_INDEX
from tuneforge.data.formats import Example
from tuneforge.errors import TemplateError

log = logging.getLogger(__name__)

TRAIN_ON = ("assistant", "all")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Plain Alpaca layout; the response ends with eos_token so the model learns to stop.
ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
BUILTIN_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "alpaca": ALPACA}

_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def apply_template(tokenizer: Any, template: str | None) -> None:
    """Keep the tokenizer's own template (None / "auto"), or set a built-in one by name."""
    if template in (None, "auto"):
        if not getattr(tokenizer, "chat_template", None):
            names = ", ".join(BUILTIN_TEMPLATES)
            raise TemplateError(
                f"the tokenizer has no chat template: set data.template: chatml (built-ins: {names})"
            )
        return
    if template in BUILTIN_TEMPLATES:
        tokenizer.chat_template = BUILTIN_TEMPLATES[template]
    elif "{{" in template or "{%" in template:
        tokenizer.chat_template = template  # a literal jinja template
    else:
        names = ", ".join(BUILTIN_TEMPLATES)
        raise TemplateError(
            f"data.template: {template!r} is not auto, one of {names}, or a jinja template"
        )
    _warn_if_no_stop_token(tokenizer, template)


def _warn_if_no_stop_token(tokenizer: Any, template: str) -> None:
    # A marker that is not a special token of this tokenizer (ChatML on a base model) is trained
    # as ordinary text pieces; generation then stops at the text (end_of_turn). Only a template
    # whose assistant turn ends with nothing at all leaves the model no way to learn to stop.
    eot = end_of_turn(tokenizer)
    if eot.texts:
        log.info(
            "chat template: the end-of-turn marker %r is not a token of this vocabulary; it is "
            "trained as text and generation stops at the text",
            eot.texts[0],
        )
        return
    ids, labels = render(tokenizer, Example(messages=_PROBE))
    if not any(label in eot.token_ids for label in labels if label != IGNORE_INDEX):
        warnings.warn(
            f"chat template {template[:40]!r}: the assistant turn ends with no marker and no "
            "special token, so the model will not learn to stop; pick a template that ends turns",
            stacklevel=3,
        )


@dataclass(frozen=True)
class EndOfTurn:
    """What ends an assistant turn under a tokenizer's chat template.

    `token_ids`: eos and the special token that closes a turn, where the vocabulary has one;
    `texts`: the closing marker as text where it is not one token of this vocabulary (ChatML's
    `<|im_end|>` on a base model's tokenizer). Generation stops at either and shows neither.
    """

    token_ids: frozenset[int]
    texts: tuple[str, ...]


_SENTINEL = "tuneforge end-of-turn probe"


def end_of_turn(tokenizer: Any) -> EndOfTurn:
    """The end-of-turn marker of the tokenizer's chat template, as token ids and/or text."""
    ids = {tokenizer.eos_token_id} - {None}
    marker = _closing_marker(tokenizer)
    if not marker:
        return EndOfTurn(frozenset(ids), ())
    pieces = list(tokenizer(marker, add_special_tokens=False)["input_ids"])
    if pieces and pieces[0] in _special_ids(tokenizer):
        return EndOfTurn(frozenset(ids | {pieces[0]}), ())
    return EndOfTurn(frozenset(ids), (marker,))


def stop_sequences(tokenizer: Any) -> list[str]:
    """End-of-turn markers generation must stop at as text (for llama.cpp's / OpenAI's `stop`)."""
    return list(end_of_turn(tokenizer).texts)


def cut_at_text(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """`text` before the first occurrence of any stop text (all of it when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def _closing_marker(tokenizer: Any) -> str:
    """What the template writes after an assistant message's content, whitespace stripped."""
    if not getattr(tokenizer, "chat_template", None):
        return ""
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        prompt = _render_text(tokenizer, turns[:1], add_generation_prompt=True)
        full = _render_text(tokenizer, turns, add_generation_prompt=False)
    except TemplateError:
        return ""
    at = full.find(_SENTINEL, len(prompt) if full.startswith(prompt) else 0)
    return full[at + len(_SENTINEL) :].strip() if at >= 0 else ""


def render(
    tokenizer: Any, example: Example, train_on: str = "assistant"
) -> tuple[list[int], list[int]]:
    """input_ids and labels (-100 = no loss) for one example, as the tokenizer's template renders it."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on: {train_on!r} is not one of {', '.join(TRAIN_ON)}")
    if example.text is not None:
        return _render_plain_text(tokenizer, example.text)
    full_text, spans = _assistant_spans(tokenizer, example.messages)
    cuts = [c for span in spans for c in span]
    ids, offsets = _encode_with_offsets(tokenizer, full_text, cuts)
    if train_on == "all":
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    special = _special_ids(tokenizer)
    for start, end in spans:
        in_span = [k for k, (a, b) in enumerate(offsets) if a < end and b > start]
        for k in _through_end_of_turn(in_span, ids, special):
            labels[k] = ids[k]
    return ids, labels


def render_prompt(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Prompt ids for generation: the conversation plus the assistant header, encoded as render does."""
    text = _render_text(tokenizer, messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render_plain_text(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TemplateError("the tokenizer has no eos token: plain-text examples end with one")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return ids, list(ids)


def _render_text(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        names = ", ".join(BUILTIN_TEMPLATES)
        raise TemplateError(
            "the tokenizer has no chat template (a base model): set data.template for training, "
            f"or pass --template to eval / generate (built-ins: {names})"
        )
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except (jinja2.TemplateError, ValueError, TypeError) as e:
        raise TemplateError(f"the chat template failed: {e}") from e
    if not isinstance(text, str):
        raise TemplateError(f"the chat template returned {type(text).__name__}, expected text")
    return text


def _assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full text and, per assistant turn, the character span it adds after its prompt.

    The span of turn i is render(messages[:i+1]) minus render(messages[:i], generation prompt);
    both must be prefixes of the full text, or the masks would not match what is trained.
    """
    full_text = _render_text(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise TemplateError(
                "the conversation starts with an assistant turn: nothing prompts it"
            )
        prompt = _render_text(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render_text(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prompt) and full_text.startswith(upto)):
            raise TemplateError(
                f"the chat template is not prefix-stable at assistant turn {i}: rendering the "
                "conversation up to a turn must extend the rendering before it; choose another "
                "data.template (e.g. chatml)"
            )
        spans.append((len(prompt), len(upto)))
    return full_text, spans


def _encode_with_offsets(
    tokenizer: Any, text: str, cuts: list[int]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (exactly as the template path encodes it) and each token's char span."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    return _offsets_by_prefix_encoding(tokenizer, text, cuts)


def _offsets_by_prefix_encoding(
    tokenizer: Any, text: str, cuts: list[int]
) -> tuple[list[int], list[tuple[int, int]]]:
    # Slow tokenizers give no offsets: encode the text up to each turn boundary instead, and
    # give every token between two boundaries the span between them.
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    offsets: list[tuple[int, int]] = []
    prev_char = 0
    for cut in sorted(set(cuts) | {len(text)}):
        piece = (
            ids
            if cut == len(text)
            else tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
        )
        if list(piece) != ids[: len(piece)]:
            raise TemplateError(
                f"tokens merge across a turn boundary at character {cut}; use a fast tokenizer"
            )
        offsets += [(prev_char, cut)] * (len(piece) - len(offsets))
        prev_char = cut
    return ids, offsets


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, token in decoder.items() if getattr(token, "special", False))
    return ids


def _through_end_of_turn(positions: list[int], ids: list[int], special: set[int]) -> list[int]:
    """The span's tokens up to and including the first special token after the content.

    That token (e.g. <|im_end|>, <|eot_id|>, eos) is what teaches the model to stop; whatever
    the template emits after it (a newline) belongs to the next prompt and is not trained.
    """
    seen_content = False
    for n, k in enumerate(positions):
        if ids[k] in special and seen_content:
            return positions[: n + 1]
        seen_content = seen_content or ids[k] not in special
    return positions
