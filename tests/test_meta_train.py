"""Meta-training on a tiny model with two toy task families: Reptile's meta-adapter adapts better
than a fresh adapter on held-out tasks, only because of the meta-update; resume is exact;
`method.init_from` loads exactly the saved adapter."""

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.errors import ConfigError, ResumeRefused
from tuneforge.recipes import meta_train
from tuneforge.recipes.meta_train import run_meta_training

from conftest import build_tiny_llama
from helpers import CpuAccelerator, write_run_config

THINGS = ["apple", "sky", "grass", "night", "snow", "rose"]
COLORS = ["red", "green", "blue", "black", "white", "pink"]
ANIMALS = ["cat", "dog", "cow", "owl", "pig", "hen"]
SOUNDS = ["meow", "woof", "moo", "hoot", "oink", "cluck"]


def write_task_families(path, rows_per_task=12):
    """Two families; each task is a fresh random pairing of the family's words (seeded)."""
    families = {
        "color": (THINGS, COLORS, "Color of {}?"),
        "sound": (ANIMALS, SOUNDS, "Sound of {}?"),
    }
    rows = []
    for family, (keys, values, prompt) in families.items():
        for t in range(5):
            rng = random.Random(f"{family}-{t}")
            answer = dict(zip(keys, rng.sample(values, len(values)), strict=True))
            for i in range(rows_per_task):
                key = keys[i % len(keys)]
                rows.append(
                    {
                        "task": f"{family}-{t}",
                        "messages": [
                            {"role": "user", "content": prompt.format(key)},
                            {"role": "assistant", "content": answer[key]},
                        ],
                    }
                )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def meta_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama with larger initial weights: with the default 0.02 its frozen output head
    caps the logits near uniform, so that no adapter could fit any task."""
    path = tmp_path_factory.mktemp("meta-llama")
    model = build_tiny_llama(len(tiny_tokenizer), initializer_range=0.2)
    model.config.eos_token_id = model.config.pad_token_id = tiny_tokenizer.eos_token_id
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def meta_config(tmp_path, model_dir, out, **meta):
    data = write_task_families(tmp_path / "tasks.jsonl")
    settings = {
        "algorithm": "reptile",
        "tasks": "task",
        "held_out": ["color-4", "sound-4"],
        "shots": 4,
        "query_shots": 4,
        "inner_steps": 3,
        "inner_lr": 0.01,
        "meta_lr": 1.0,
        "meta_steps": 30,
        "tasks_per_step": 2,
        "eval_episodes": 3,
    }
    settings.update(meta)
    return write_run_config(
        tmp_path / "meta.yaml",
        model_dir,
        data,
        out,
        method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        data={"validation": None},
        checkpoint={"every_steps": 10, "keep_last": 5},
        meta=settings,
    )


@pytest.fixture(scope="module")
def reptile_run(tmp_path_factory, meta_model_dir, one_thread):
    tmp = tmp_path_factory.mktemp("meta")
    cfg = meta_config(tmp, meta_model_dir, tmp / "run")
    assert main(["meta-train", str(cfg), "--quiet"]) == 0
    return tmp, cfg


def test_meta_adapter_adapts_better_than_a_fresh_one_on_held_out_tasks(reptile_run):
    tmp, _ = reptile_run
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    mean = summary["held_out"]["mean"]
    assert set(summary["held_out"]["tasks"]) == {"color-4", "sound-4"}
    # Adaptation helps both, and from the meta-adapter it ends far lower.
    assert mean["fresh"] < mean["fresh_before"]
    assert mean["meta"] < 0.8 * mean["fresh"], mean
    for task in summary["held_out"]["tasks"].values():
        assert task["meta"] < task["fresh"]


def test_without_the_meta_update_there_is_no_gain(
    tmp_path, meta_model_dir, one_thread, monkeypatch
):
    """The test above fails if the meta-update is skipped: the two starts are then the same."""
    monkeypatch.setattr(meta_train, "apply_meta_update", lambda params, grads, opt: None)
    cfg = load_config(meta_config(tmp_path, meta_model_dir, tmp_path / "run", meta_steps=5))
    mean = run_meta_training(cfg, show_progress=False).summary["held_out"]["mean"]
    assert mean["meta"] == mean["fresh"] and mean["meta_before"] == mean["fresh_before"]


def test_run_dir_is_a_normal_adapter_run(reptile_run):
    tmp, _ = reptile_run
    run = tmp / "run"
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "summary.json", "tokenizer"):
        assert (run / name).exists(), name
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["tasks"] == {f"{f}-{t}": 12 for f in ("color", "sound") for t in range(5)}
    # The checkpoint holds the same meta-weights as the saved adapter.
    final = load_file(str(run / "checkpoints" / "step-000030" / "model.safetensors"))
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert len(final) == len(adapter) and all(v.abs().sum() > 0 for v in adapter.values())


def _weights(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("algorithm", ["fomaml"])
def test_resume_is_exact(tmp_path, meta_model_dir, one_thread, algorithm):
    cfg_path = meta_config(
        tmp_path,
        meta_model_dir,
        tmp_path / "a",
        algorithm=algorithm,
        meta_optimizer="adam",
        meta_lr=0.01,
        meta_steps=6,
        eval_episodes=1,
    )
    overrides = ["method.dropout=0.2", "checkpoint.every_steps=3"]  # dropout: the RNG matters
    cfg = load_config(cfg_path, overrides)
    a = run_meta_training(cfg, show_progress=False)
    b_dir = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b_dir)
    for gone in ("adapter", "summary.json", "checkpoints/step-000006"):
        shutil.rmtree(b_dir / gone) if (b_dir / gone).is_dir() else (b_dir / gone).unlink()
    cfg_b = load_config(cfg_path, [*overrides, f"output.dir={b_dir}"])
    b = run_meta_training(cfg_b, show_progress=False, resume="step-000003")
    wa, wb = _weights(tmp_path / "a"), _weights(b_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.summary["held_out"] == b.summary["held_out"]
    lines = lambda d: [  # noqa: E731
        {k: v for k, v in json.loads(x).items() if k != "step_s"}
        for x in (d / "metrics.jsonl").read_text().splitlines()
    ]
    assert lines(tmp_path / "a") == lines(b_dir)
    assert [r["step"] for r in lines(b_dir)] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_changed_meta_section(tmp_path, meta_model_dir, one_thread):
    cfg_path = meta_config(tmp_path, meta_model_dir, tmp_path / "a", meta_steps=3)
    run_meta_training(load_config(cfg_path, ["checkpoint.every_steps=1"]), show_progress=False)
    changed = load_config(cfg_path, ["checkpoint.every_steps=1", "meta.inner_lr=0.1"])
    with pytest.raises(ResumeRefused, match="meta.inner_lr"):
        run_meta_training(changed, show_progress=False, resume="step-000002")


def test_init_from_loads_exactly_the_saved_adapter(reptile_run, meta_model_dir, tmp_path):
    from peft.utils import get_peft_model_state_dict

    from tuneforge.recipes.parts import build_training_model

    tmp, _ = reptile_run
    data = tmp / "tasks.jsonl"
    cfg_path = write_run_config(
        tmp_path / "train.yaml",
        meta_model_dir,
        data,
        tmp_path / "run",
        method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "init_from": str(tmp / "run")},
        train={"max_steps": 2},
    )
    built = build_training_model(load_config(cfg_path), meta_model_dir, None, CpuAccelerator())
    loaded = get_peft_model_state_dict(built.model)
    saved = _weights(tmp / "run")
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert main(["train", str(cfg_path), "--quiet"]) == 0  # and training goes on from it


def test_init_from_refuses_what_does_not_fit(reptile_run, meta_model_dir, tmp_path):
    from tuneforge.recipes.parts import build_training_model

    tmp, _ = reptile_run
    method = {"name": "lora", "r": 8, "alpha": 8, "init_from": str(tmp / "run")}
    cfg = write_run_config(
        tmp_path / "a.yaml", meta_model_dir, tmp / "tasks.jsonl", tmp_path / "x", method=method
    )
    with pytest.raises(ConfigError, match=r"shape \(4, .*method.r"):
        build_training_model(
            load_config(cfg, ["train.max_steps=1"]), meta_model_dir, None, CpuAccelerator()
        )
    method = {"name": "full", "init_from": str(tmp / "run")}
    cfg = write_run_config(
        tmp_path / "b.yaml", meta_model_dir, tmp / "tasks.jsonl", tmp_path / "x", method=method
    )
    with pytest.raises(ConfigError, match="init_from: full"):
        build_training_model(
            load_config(cfg, ["train.max_steps=1"]), meta_model_dir, None, CpuAccelerator()
        )
    method = {"name": "lora", "r": 4, "init_from": str(tmp_path)}
    cfg = write_run_config(
        tmp_path / "c.yaml", meta_model_dir, tmp / "tasks.jsonl", tmp_path / "x", method=method
    )
    with pytest.raises(ConfigError, match="no adapter/adapter_model.safetensors"):
        build_training_model(
            load_config(cfg, ["train.max_steps=1"]), meta_model_dir, None, CpuAccelerator()
        )
