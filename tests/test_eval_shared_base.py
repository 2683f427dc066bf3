"""`eval --compare BASE` where BASE is the adapter run's own base loads it once: the base scored
before the adapter goes on, the run after. The numbers equal loading each model on its own."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tuneforge.loading as loading
from tuneforge.cli import main
from tuneforge.evaluation.offline import evaluate_reference, evaluate_run_and_base
from tuneforge.loading import adapter_base_dir, run_chat_template

from helpers import write_run_config, write_toy_messages

pytestmark = pytest.mark.usefixtures("one_thread")

METRICS = ["loss", "accuracy", "exact_match"]
GEN = {"max_new_tokens": 4, "lang": "en", "zh_mode": "word"}


def _adapter_run(tmp, tiny_model_dir, method):
    """A run on the tiny model whose adapter moves every number: two steps from B = 0 barely
    change it, so its B matrices are then set to random values."""
    train = write_toy_messages(tmp / "train.jsonl", n=24)
    config = write_run_config(
        tmp / "run.yaml",
        tiny_model_dir,
        train,
        tmp / "run",
        method=method,
        data={"validation": None},
        train={"max_steps": 2},
        eval={"every_steps": None},
        log={"report": False},
    )
    assert main(["train", str(config), "--quiet"]) == 0
    path = tmp / "run" / "adapter" / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    gen = torch.Generator().manual_seed(0)
    for name, value in tensors.items():
        if "lora_B" in name:
            tensors[name] = torch.randn(value.shape, generator=gen) * 0.5
    save_file(tensors, str(path), metadata=meta)
    return tmp / "run"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    method = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    return _adapter_run(tmp_path_factory.mktemp("shared-base"), tiny_model_dir, method)


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory, tiny_model_dir):
    """DoRA does not fold without peft: it loads through peft and merges in place."""
    method = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "dora": True}
    return _adapter_run(tmp_path_factory.mktemp("shared-base-dora"), tiny_model_dir, method)


@pytest.fixture(scope="module")
def test_file(tmp_path_factory):
    return write_toy_messages(tmp_path_factory.mktemp("shared-data") / "test.jsonl", n=12, seed=3)


def _separately(run, base, data):
    template = run_chat_template(run)
    base_out = evaluate_reference(str(base), str(data), METRICS, 4, template=template, **GEN)
    return base_out, evaluate_reference(str(run), str(data), METRICS, 4, **GEN)


def test_one_load_gives_the_numbers_of_two(lora_run, tiny_model_dir, test_file):
    """Equal to the last bit: an adapter leaking into the base's scores (or the base's state
    into the run's) would move them, as the run's numbers are far from the base's."""
    assert adapter_base_dir(lora_run) == tiny_model_dir
    template = run_chat_template(lora_run)
    want_base, want_run = _separately(lora_run, tiny_model_dir, test_file)
    both = evaluate_run_and_base(
        str(lora_run), str(tiny_model_dir), str(test_file), METRICS, 4, template=template, **GEN
    )
    assert both is not None
    got_base, got_run = both
    assert got_base == want_base
    assert got_run == want_run
    assert abs(want_run["loss"] - want_base["loss"]) > 0.01  # far above fp32 noise
    assert want_base["examples"] == want_run["examples"] == 12


def test_cli_loads_the_runs_own_base_once(
    lora_run, tiny_model_dir, test_file, tmp_path, monkeypatch, capsys
):
    loads = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    out = tmp_path / "cmp.json"
    args = ["eval", "--model", str(lora_run), "--compare", str(tiny_model_dir)]
    args += ["--data", str(test_file), "--metrics", ",".join(METRICS), "--batch-size", "4"]
    assert main([*args, "--max-new-tokens", "4", "--lang", "en", "--output", str(out)]) == 0
    assert loads == [tiny_model_dir]
    bars = capsys.readouterr().err
    assert "eval base: loss + labels" in bars and f"eval {lora_run}: loss + labels" in bars
    rows = json.loads(out.read_text())
    assert list(rows) == [f"base ({tiny_model_dir})", str(lora_run)]  # the table's order
    want_base, want_run = _separately(lora_run, tiny_model_dir, test_file)
    assert rows[f"base ({tiny_model_dir})"] == json.loads(json.dumps(want_base))
    assert rows[str(lora_run)] == json.loads(json.dumps(want_run))


def test_another_base_is_loaded_on_its_own(lora_run, tiny_model_dir, test_file, tmp_path):
    """A copy of the base elsewhere is another model as far as eval knows: no sharing."""
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert evaluate_run_and_base(str(lora_run), str(copy), str(test_file), ["loss"]) is None
    assert evaluate_run_and_base(str(copy), str(copy), str(test_file), ["loss"]) is None


@pytest.mark.parametrize("run_fixture", ["lora_run", "dora_run"])
def test_side_by_side_gives_the_numbers_of_one_after_the_other(
    run_fixture, request, tiny_model_dir, test_file
):
    """Both models scored at once, each in a thread of its own (the run on its own copy of the
    base): the same numbers, to the last bit, as the base first and the adapter onto it after,
    for an adapter folded without peft (LoRA) and one merged by peft in place (DoRA)."""
    run = request.getfixturevalue(run_fixture)
    template = run_chat_template(run)
    args = (str(run), str(tiny_model_dir), str(test_file), METRICS, 4)
    serial = evaluate_run_and_base(*args, template=template, side_by_side=False, **GEN)
    both = evaluate_run_and_base(*args, template=template, side_by_side=True, **GEN)
    assert both == serial
    assert abs(both[0]["loss"] - both[1]["loss"]) > 0.01  # two different models
    assert torch.get_num_threads() == 1  # the thread split is put back


def test_side_by_side_only_with_threads_to_split(tiny_model_dir):
    from tuneforge.evaluation.offline import _fits_side_by_side

    model = loading.load_reference(str(tiny_model_dir)).model
    assert not _fits_side_by_side(model)  # this module runs on one thread
    torch.set_num_threads(2)
    try:
        assert _fits_side_by_side(model)  # a few MB: fits anywhere
    finally:
        torch.set_num_threads(1)


def test_a_failing_side_raises_in_the_caller():
    from tuneforge.evaluation.offline import _at_once

    def fails():
        raise ValueError("bad row")

    with pytest.raises(ValueError, match="bad row"):
        _at_once(lambda: 1, fails)
    assert _at_once(lambda: 1, lambda: 2) == (1, 2)
