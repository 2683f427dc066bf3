"""Chat-template rendering: exact assistant-only loss masks, multi-turn, text format, prompts.

Uses the tiny ChatML tokenizer from conftest; no model.
"""

from __future__ import annotations

import copy
import warnings

import pytest

from tuneforge.data.formats import Example
from tuneforge.data.templates import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    apply_template,
    render,
    render_prompt,
)
from tuneforge.errors import TemplateError

SINGLE = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
    {"role": "user", "content": "And the fox?"},
    {"role": "assistant", "content": "The quick brown fox jumps."},
]
# Like SmolLM2's real template: a default system prompt when the conversation has none.
DEFAULT_SYSTEM = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a good review book.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture
def tok(tiny_tokenizer):
    """A private copy: tests change the chat template."""
    return copy.deepcopy(tiny_tokenizer)


def trained_runs(tok, ids, labels):
    """Decoded text of each contiguous run of trained tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def test_builtin_templates_exist():
    assert {"chatml", "llama3", "alpaca"} <= set(BUILTIN_TEMPLATES)


def test_single_turn_mask_is_exactly_the_answer_and_end_of_turn(tok):
    ids, labels = render(tok, Example(messages=SINGLE))
    assert len(ids) == len(labels)
    assert trained_runs(tok, ids, labels) == ["Two plus two is four.<|im_end|>"]
    # the trailing newline after <|im_end|> is not trained
    assert ids[-1] != tok.eos_token_id and labels[-1] == IGNORE_INDEX


def test_ids_agree_with_apply_chat_template(tok):
    ids, _ = render(tok, Example(messages=MULTI))
    assert ids == tok.apply_chat_template(MULTI, tokenize=True, return_dict=False)


def test_multi_turn_trains_every_assistant_turn_and_no_user_turn(tok):
    ids, labels = render(tok, Example(messages=MULTI))
    assert trained_runs(tok, ids, labels) == [
        "Two plus two is four.<|im_end|>",
        "The quick brown fox jumps.<|im_end|>",
    ]
    untrained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX])
    assert "What is two plus two?" in untrained and "And the fox?" in untrained
    assert "Be brief." in untrained


def test_train_on_all(tok):
    ids, labels = render(tok, Example(messages=MULTI), train_on="all")
    assert labels == ids
    with pytest.raises(ValueError, match="train_on"):
        render(tok, Example(messages=MULTI), train_on="prompt")


def test_text_format_is_text_plus_eos_all_trained(tok):
    ids, labels = render(tok, Example(messages=[], text="The quick brown fox."))
    assert labels == ids
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "The quick brown fox.<|im_end|>"


def test_render_prompt_is_the_training_prefix(tok):
    prompt = render_prompt(tok, SINGLE[:1])
    ids, labels = render(tok, Example(messages=SINGLE))
    assert ids[: len(prompt)] == prompt
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert all(label == IGNORE_INDEX for label in labels[: len(prompt)])
    assert labels[len(prompt)] != IGNORE_INDEX  # the answer's first token is trained


def test_default_system_prompt_template_stays_consistent(tok):
    tok.chat_template = DEFAULT_SYSTEM
    ids, labels = render(tok, Example(messages=SINGLE))
    assert trained_runs(tok, ids, labels) == ["Two plus two is four.<|im_end|>"]
    prompt = render_prompt(tok, SINGLE[:1])
    assert ids[: len(prompt)] == prompt and "You are a good review book." in tok.decode(prompt)


@pytest.mark.parametrize(("name", "end"), [("chatml", "<|im_end|>"), ("alpaca", "<|im_end|>")])
def test_builtin_templates_mask_answer_and_stop_token(tok, name, end):
    apply_template(tok, name)
    ids, labels = render(tok, Example(messages=MULTI))
    assert trained_runs(tok, ids, labels) == [
        "Two plus two is four." + end,
        "The quick brown fox jumps." + end,
    ]


def test_alpaca_template_layout(tok):
    apply_template(tok, "alpaca")
    text = tok.decode(render_prompt(tok, SINGLE[:1]))
    assert text == "### Instruction:\nWhat is two plus two?\n\n### Response:\n"


def test_template_whose_marker_is_text_trains_it_as_text(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a text marker is supported: generation stops at it
        apply_template(tok, "llama3")  # the tiny tokenizer has no <|eot_id|> token
    ids, labels = render(tok, Example(messages=SINGLE))
    assert trained_runs(tok, ids, labels) == ["Two plus two is four.<|eot_id|>"]


def test_template_that_never_ends_a_turn_warns(tok):
    bare = "{% for m in messages %}{{ m['content'] + ' ' }}{% endfor %}"
    with pytest.warns(UserWarning, match="will not learn to stop"):
        apply_template(tok, bare)


def test_apply_template_auto_and_errors(tok):
    before = tok.chat_template
    apply_template(tok, None)
    apply_template(tok, "auto")
    assert tok.chat_template == before
    tok.chat_template = None
    with pytest.raises(TemplateError, match="data.template: chatml"):
        apply_template(tok, "auto")
    with pytest.raises(TemplateError, match="'vicuna' is not auto, one of chatml"):
        apply_template(tok, "vicuna")
    apply_template(tok, BUILTIN_TEMPLATES["chatml"])  # a literal jinja template is accepted
    assert tok.chat_template == BUILTIN_TEMPLATES["chatml"]


def test_template_that_is_not_prefix_stable_is_refused(tok):
    # the generation prompt says "assistant" but the rendered turn says "bot"
    tok.chat_template = BUILTIN_TEMPLATES["chatml"].replace(
        "'<|im_start|>' + message['role']",
        "'<|im_start|>' + ('bot' if message['role'] == 'assistant' else message['role'])",
    )
    with pytest.raises(TemplateError, match="not prefix-stable at assistant turn 1"):
        render(tok, Example(messages=SINGLE))


def test_template_exception_becomes_template_error(tok):
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TemplateError, match="roles must alternate"):
        render(tok, Example(messages=SINGLE))


class _SlowTokenizer:
    """The tiny tokenizer without offsets, as a slow (Python) tokenizer would be."""

    is_fast = False

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, text, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self._inner(text, **kwargs)


def test_slow_tokenizer_path_gives_the_same_masks(tok):
    example = Example(messages=MULTI)
    assert render(_SlowTokenizer(tok), example) == render(tok, example)
