"""AdaLoRA: the rank budget shrinks to target_r x modules by tfinal and stays there; the update runs
with the step's gradients (after optimizer.step, before zero_grad); ranks reach summary.json and
survive save/reload; the schedule defaults follow the run length."""

import json

import pytest
import torch

import tuneforge.recipe as recipe
from tuneforge.config import ConfigError, load_config
from tuneforge.methods.adalora import AdaLora, adalora_schedule, final_ranks

from helpers import write_run_config, write_toy_messages

STEPS, TINIT, TFINAL = 12, 2, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def test_ranks_shrink_to_the_budget_by_tfinal(tmp_path, tiny_model_dir, monkeypatch):
    data = write_toy_messages(tmp_path / "train.jsonl", n=48)
    cfg = write_run_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        data,
        tmp_path / "run",
        method={"name": "adalora", "init_r": 6, "target_r": 2, "tinit": TINIT, "tfinal": TFINAL},
        train={"max_steps": STEPS, "lr": 1e-2},
        log={"report": False},
    )
    seen: list[tuple[int, int, bool]] = []
    on_step = AdaLora.on_step

    def spy(self, model, step):
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
        on_step(self, model, step)
        seen.append((step, sum(final_ranks(model).values()), all(g is not None for g in grads)))

    monkeypatch.setattr(AdaLora, "on_step", spy)
    summary = recipe.run_training(load_config(cfg), show_progress=False).summary["method"]
    modules = len(summary["ranks"])
    assert modules == 14  # 7 linear layers x 2 blocks
    assert summary["initial_total_rank"] == 6 * modules
    assert summary["target_total_rank"] == 2 * modules
    assert [s for s, _, _ in seen] == list(range(STEPS))
    assert all(has_grad for _, _, has_grad in seen)  # called before zero_grad
    totals = {step + 1: total for step, total, _ in seen}  # after step + 1 optimizer steps
    assert all(totals[s] == 6 * modules for s in range(1, TINIT + 1))
    assert all(totals[s] == 2 * modules for s in range(STEPS - TFINAL, STEPS + 1))
    pruning = [totals[s] for s in range(TINIT, STEPS - TFINAL + 1)]
    assert pruning == sorted(pruning, reverse=True)  # the cubic schedule only shrinks
    assert any(2 * modules < t < 6 * modules for t in pruning)
    assert summary["total_rank"] == 2 * modules
    assert len(set(summary["ranks"].values())) > 1  # allocated unevenly: that is the point

    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["total_step"] == STEPS and adapter["tinit"] == TINIT
    from tuneforge.loading import load_reference

    reloaded = load_reference(tmp_path / "run", dtype="fp32").model
    shapes = {
        n.split(".lora_E.")[0].removeprefix("base_model.model."): p.shape[0]
        for n, p in reloaded.named_parameters()
        if ".lora_E." in n
    }
    assert shapes == summary["ranks"]  # saved with the pruned ranks cut out


def test_schedule_defaults_follow_the_run_length():
    assert adalora_schedule(100, None, None, None) == (10, 20, 7)
    assert adalora_schedule(10, None, None, None) == (1, 2, 1)
    assert adalora_schedule(100, 5, 5, 3) == (5, 5, 3)
    with pytest.raises(ConfigError, match=r"method.tinit \+ method.tfinal"):
        adalora_schedule(10, 5, 5, None)


def test_eval_loss_is_free_of_the_orthogonality_penalty(tiny_tokenizer):
    from tuneforge.config import build_config
    from tuneforge.methods import build_method

    from conftest import build_tiny_llama

    method = build_method(build_config({"method": {"name": "adalora"}}).method)
    method.plan(20)
    base = build_tiny_llama(len(tiny_tokenizer))
    ids = torch.randint(3, len(tiny_tokenizer), (2, 9))
    with torch.no_grad():
        plain = base(input_ids=ids, labels=ids).loss
    model = method.apply(base)
    with torch.no_grad():
        evaluated = model.eval()(input_ids=ids, labels=ids).loss
        trained = model.train()(input_ids=ids, labels=ids).loss
    assert evaluated == pytest.approx(plain.item(), abs=1e-6)  # B = 0 at init: same model
    assert trained > evaluated + 0.1  # training adds the orthogonality term
