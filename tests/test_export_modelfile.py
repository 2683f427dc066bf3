"""The chat template split into turns, and the Ollama Modelfile built from it (no model needed)."""

from __future__ import annotations

import pytest

from tuneforge.data.templates import BUILTIN_TEMPLATES
from tuneforge.errors import ExportError
from tuneforge.export.chatformat import stop_ids, turn_format
from tuneforge.export.modelfile import go_template, render_modelfile

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_GO = (
    '{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
    "{{ end }}{{ end }}<|im_start|>assistant\n"
)


@pytest.fixture
def tok(tiny_tokenizer):
    saved = tiny_tokenizer.chat_template
    yield tiny_tokenizer
    tiny_tokenizer.chat_template = saved


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_every_builtin_template_splits_and_rerenders(tok, name):
    tok.chat_template = BUILTIN_TEMPLATES[name]
    fmt = turn_format(tok)
    messages = [
        {"role": "system", "content": "Short answers."},
        {"role": "user", "content": "Colour of snow?"},
        {"role": "assistant", "content": "white"},
        {"role": "user", "content": "And grass?\nOne word."},
    ]
    for gen in (False, True):
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert fmt.render(messages, gen) == expected


def test_chatml_go_template_and_modelfile(tok):
    fmt = turn_format(tok)
    assert fmt.default_system is None and fmt.start == ""
    assert go_template(fmt) == CHATML_GO
    text = render_modelfile(
        "m-q4_k_m.gguf", fmt, ["<|im_end|>"], generation={"temperature": 0.2}, num_ctx=2048
    )
    assert text == (
        f'FROM ./m-q4_k_m.gguf\nTEMPLATE """{CHATML_GO}"""\nPARAMETER stop """<|im_end|>"""\n'
        "PARAMETER temperature 0.2\nPARAMETER num_ctx 2048\n"
    )
    assert stop_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_a_default_system_prompt_becomes_system(tok):
    tok.chat_template = SMOLLM2
    fmt = turn_format(tok)
    assert (
        fmt.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    assert fmt.prefix["system"] == "<|im_start|>system\n" and fmt.start == ""
    assert f'SYSTEM """{fmt.default_system}"""' in render_modelfile("m.gguf", fmt, [])


def test_llama3_opening_bos_is_kept_once(tok):
    tok.chat_template = BUILTIN_TEMPLATES["llama3"]
    fmt = turn_format(tok)
    assert fmt.start == tok.bos_token
    assert go_template(fmt).startswith(tok.bos_token + "{{ range .Messages }}")
    assert go_template(fmt, drop_start=True).startswith("{{ range .Messages }}")


def test_a_template_that_is_not_per_turn_is_reported(tok):
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    )
    with pytest.raises(ExportError, match="cannot be split into per-role turns"):
        turn_format(tok)
