"""Base (non-chat) models: a tokenizer with no chat template and no ChatML specials, trained with
data.template: chatml. Generation stops at the text marker and never shows it; eval scores the
base with the run's template; a bare base needs --template, and says so."""

from __future__ import annotations

import json

import pytest
import torch

from tuneforge.cli import main
from tuneforge.data.formats import Example
from tuneforge.data.pipeline import TokenizedExample
from tuneforge.data.templates import (
    BUILTIN_TEMPLATES,
    apply_template,
    cut_at_text,
    end_of_turn,
    render,
    render_prompt,
    stop_sequences,
)
from tuneforge.errors import TemplateError
from tuneforge.evaluation.generation import generate_answers, items_from_tokenized
from tuneforge.evaluation.offline import evaluate_reference
from tuneforge.loading import Loaded, generate, load_reference, run_chat_template

from conftest import build_tiny_base_tokenizer, build_tiny_llama, build_tiny_tokenizer
from helpers import write_run_config, write_toy_messages

pytestmark = pytest.mark.usefixtures("one_thread")

#: The answer the issue reported: the marker printed, then a second turn.
LEAKED = "positive<|im_end|>\npositive<|im_end"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A saved tiny Llama with the base tokenizer: no chat template, eos = <|endoftext|>."""
    tok = build_tiny_base_tokenizer()
    path = tmp_path_factory.mktemp("tiny-base")
    model = build_tiny_llama(len(tok), seed=1)
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class _ScriptedHead(torch.nn.Module):
    """An output head whose greedy choice at call k is script[k]: generation emits the script."""

    def __init__(self, vocab: int, script: list[int]) -> None:
        super().__init__()
        self.vocab, self.script, self.calls = vocab, script, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*hidden.shape[:-1], self.vocab)
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 50.0
        self.calls += 1
        return logits


def _scripted_model(tok, text: str):
    script = tok(text, add_special_tokens=False)["input_ids"]
    model = build_tiny_llama(len(tok)).eval()
    model.lm_head = _ScriptedHead(len(tok), script)
    return model, script


def test_end_of_turn_is_a_token_where_the_vocabulary_has_one_else_text():
    base = build_tiny_base_tokenizer()
    assert len(base("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1  # not a token
    apply_template(base, "chatml")
    assert end_of_turn(base).texts == ("<|im_end|>",)
    assert end_of_turn(base).token_ids == {base.eos_token_id}
    assert stop_sequences(base) == ["<|im_end|>"]
    apply_template(base, "alpaca")  # ends turns with eos_token: a special token here
    assert end_of_turn(base).texts == () and end_of_turn(base).token_ids == {base.eos_token_id}
    chat = build_tiny_tokenizer()  # <|im_end|> is a special token of this one
    im_end = chat.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn(chat).texts == () and im_end in end_of_turn(chat).token_ids
    apply_template(chat, "llama3")  # <|eot_id|> is no token of the tiny vocabulary
    assert end_of_turn(chat).texts == ("<|eot_id|>",)


def test_cut_at_text_keeps_what_precedes_the_first_marker():
    assert cut_at_text(LEAKED, ("<|im_end|>",)) == "positive"
    assert cut_at_text("a<|eot_id|>b<|im_end|>", ("<|im_end|>", "<|eot_id|>")) == "a"
    assert cut_at_text("no marker", ("<|im_end|>",)) == "no marker"
    assert cut_at_text("abc", ()) == "abc"


def test_training_labels_the_marker_as_text_so_the_model_learns_to_stop():
    tok = build_tiny_base_tokenizer()
    apply_template(tok, "chatml")
    ex = Example(
        messages=[
            {"role": "user", "content": "Review: great"},
            {"role": "assistant", "content": "positive"},
        ]
    )
    ids, labels = render(tok, ex)
    trained = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
    assert trained == "positive<|im_end|>\n"


def test_generate_stops_at_the_text_marker_and_never_shows_it():
    tok = build_tiny_base_tokenizer()
    apply_template(tok, "chatml")
    model, script = _scripted_model(tok, LEAKED)
    loaded = Loaded(model, tok, "base", None)
    assert generate(loaded, "Review: great", max_new_tokens=len(script)) == "positive"
    # It stopped as soon as the marker was complete, not at max_new_tokens.
    marker_end = len(tok("positive<|im_end|>", add_special_tokens=False)["input_ids"])
    assert model.lm_head.calls == marker_end


def test_generate_without_the_fix_would_show_the_marker():
    """The control: the same scripted model, decoded the old way (eos only), leaks the marker."""
    tok = build_tiny_base_tokenizer()
    apply_template(tok, "chatml")
    model, script = _scripted_model(tok, LEAKED)
    ids = torch.tensor([render_prompt(tok, [{"role": "user", "content": "x"}])])
    out = model.generate(
        input_ids=ids, max_new_tokens=len(script), do_sample=False, eos_token_id=tok.eos_token_id
    )
    assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == LEAKED


def test_batched_eval_generation_cuts_each_row_at_the_marker():
    tok = build_tiny_base_tokenizer()
    apply_template(tok, "chatml")
    model, script = _scripted_model(tok, LEAKED)
    rows = []
    for user in ("Review: great", "Review: book good"):
        ex = Example(
            messages=[
                {"role": "user", "content": user},
                {"role": "assistant", "content": "positive"},
            ],
            source="t:1",
        )

        rows.append(TokenizedExample(*render(tok, ex), source=ex.source))
    items, stops = items_from_tokenized(rows, tok)
    assert [item.reference for item in items] == ["positive", "positive"]  # marker cut there too
    opts = dict(stop_ids=stops, max_new_tokens=len(script), batch_size=2)
    assert generate_answers(model, tok, items, **opts) == ["positive", "positive"]


def test_a_bare_base_names_the_template_option(base_dir, tmp_path, capsys):
    data = write_toy_messages(tmp_path / "test.jsonl", n=4)
    code = main(["eval", "--model", str(base_dir), "--data", str(data), "--metrics", "loss"])
    err = capsys.readouterr().err
    assert code == 2 and "--template" in err and "Traceback" not in err
    assert "chat_template is not set" not in err
    code = main(["generate", "--model", str(base_dir), "--prompt", "hi", "--max-new-tokens", "2"])
    assert code == 2 and "--template" in capsys.readouterr().err
    out = tmp_path / "bare.json"
    args = ["eval", "--model", str(base_dir), "--data", str(data), "--output", str(out)]
    assert main([*args, "--metrics", "loss", "--template", "chatml"]) == 0
    expected = evaluate_reference(str(base_dir), str(data), ["loss"], template="chatml")
    assert json.loads(out.read_text())[str(base_dir)]["loss"] == pytest.approx(expected["loss"])


def test_run_on_a_base_model_compares_with_the_runs_template(base_dir, tmp_path):
    """The issue's path: train a base with data.template: chatml, then eval --compare BASE."""
    data = write_toy_messages(tmp_path / "train.jsonl", n=24)
    test = write_toy_messages(tmp_path / "test.jsonl", n=6, seed=5)
    config = write_run_config(
        tmp_path / "run.yaml",
        base_dir,
        data,
        tmp_path / "run",
        data={"template": "chatml", "validation": None},
        train={"max_steps": 2},
        eval={"every_steps": None},
        log={"report": False},
    )
    assert main(["train", str(config), "--quiet"]) == 0
    run = tmp_path / "run"
    assert run_chat_template(run) == BUILTIN_TEMPLATES["chatml"]
    out = tmp_path / "cmp.json"
    args = ["eval", "--model", str(run), "--compare", str(base_dir), "--data", str(test)]
    assert main([*args, "--metrics", "loss,accuracy", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())
    base_row = rows[f"base ({base_dir})"]
    # The base was scored on the run's prompts: exactly what evaluating it under chatml gives.
    direct = evaluate_reference(str(base_dir), str(test), ["loss", "accuracy"], template="chatml")
    assert base_row["loss"] == pytest.approx(direct["loss"])
    assert base_row["accuracy"] == pytest.approx(direct["accuracy"])
    assert rows[str(run)]["loss"] != pytest.approx(base_row["loss"])  # the run did train


def test_load_reference_applies_a_template_to_a_base_only(base_dir):
    loaded = load_reference(base_dir, template="chatml")
    assert loaded.tokenizer.chat_template == BUILTIN_TEMPLATES["chatml"]
    with pytest.raises(TemplateError, match="--template"):
        render_prompt(load_reference(base_dir).tokenizer, [{"role": "user", "content": "x"}])
