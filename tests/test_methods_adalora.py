"""AdaLoRA: the rank budget shrinks to target_r x modules by tfinal and stays there; the update runs
with the step's gradients (after optimizer.step, before zero_grad); ranks reach summary.json and
survive save/reload; the schedule defaults follow the run length."""

import json

import pytest
import torch

import tuneforge.recipes.train as recipe
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
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
    # Saved with the pruned ranks cut out; a module pruned to rank 0 keeps one all-zero slot (no
    # zero-sized tensors in the adapter), so it still adds exactly nothing.
    assert shapes == {k: max(v, 1) for k, v in summary["ranks"].items()}
    assert final_ranks(reloaded) == summary["ranks"]


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


@pytest.mark.parametrize("resume_at", [5, 10])
def test_resume_is_bit_identical(tmp_path, tiny_model_dir, resume_at):
    """The allocator's importance averages and rank pattern are checkpointed: a run resumed while
    ranks are being pruned (step 5) or after the final allocation (step 10: without the saved
    pattern peft cannot re-apply it) ends with the uninterrupted run's weights and ranks."""
    import shutil

    from safetensors.torch import load_file

    from tuneforge.cli import main

    data = write_toy_messages(tmp_path / "train.jsonl", n=48)
    method = {"name": "adalora", "init_r": 6, "target_r": 2, "tinit": TINIT, "tfinal": TFINAL}
    cfg = write_run_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        data,
        tmp_path / "run",
        method=method,
        train={"max_steps": STEPS, "lr": 1e-2},
        checkpoint={"every_steps": 5, "keep_last": 3},
        log={"report": False},
    )
    assert main(["train", str(cfg), "--quiet"]) == 0
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    name = f"step-{resume_at:06d}"
    shutil.copytree(tmp_path / "run" / "checkpoints" / name, resumed / "checkpoints" / name)
    args = ["train", str(cfg), f"output.dir={resumed}", "--quiet", "--resume", name]
    assert main(args) == 0
    runs = (tmp_path / "run", resumed)
    weights = [load_file(d / "adapter" / "adapter_model.safetensors") for d in runs]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
    summaries = [json.loads((d / "summary.json").read_text()) for d in runs]
    assert summaries[0]["method"]["ranks"] == summaries[1]["method"]["ranks"]
