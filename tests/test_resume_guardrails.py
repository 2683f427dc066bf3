"""R3: a bad resume fails loudly. Missing, corrupt or out-of-root checkpoints exit 2; a changed
base model, data, max_length, batch size, grad_accum, method or seed is refused naming the field."""

import json
import logging
import shutil

import pytest

from tuneforge.cli import main

from conftest import build_tiny_llama
from helpers import write_run_config, write_toy_messages


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A finished tiny run with checkpoints at steps 2 and 4 (in-process)."""
    tmp = tmp_path_factory.mktemp("guard")
    data = write_toy_messages(tmp / "train.jsonl", n=24)
    cfg = write_run_config(
        tmp / "run.yaml",
        tiny_model_dir,
        data,
        tmp / "run",
        train={"max_steps": 4},
        checkpoint={"every_steps": 2, "keep_last": 3},
    )
    assert main(["train", str(cfg), "--quiet"]) == 0
    return tmp, cfg


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the finished run, so that each test may damage its own."""
    src, cfg = trained
    shutil.copytree(src / "run", tmp_path / "run")
    return tmp_path / "run", cfg


def _resume(cfg, run, *extra, resume="auto"):
    overrides = [f"output.dir={run}", *[e for e in extra if "=" in e]]
    flags = [e for e in extra if "=" not in e]
    return main(["train", str(cfg), *overrides, "--quiet", *flags, "--resume", resume])


def _untouched(run, before):
    assert (run / "summary.json").is_file()  # a refused resume leaves the finished run as it was
    assert (run / "metrics.jsonl").read_text() == before


def test_missing_checkpoint_exits_2_and_never_starts_fresh(run_copy, capsys):
    run, cfg = run_copy
    before = (run / "metrics.jsonl").read_text()
    assert _resume(cfg, run, resume="step-000099") == 2
    assert "does not exist" in capsys.readouterr().err
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".tmp-step-000006").mkdir()  # a torn save is not a checkpoint
    assert _resume(cfg, run) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    _untouched(run, before)


def test_corrupt_checkpoint_exits_2(run_copy, capsys):
    run, cfg = run_copy
    before = (run / "metrics.jsonl").read_text()
    weights = run / "checkpoints" / "step-000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert _resume(cfg, run) == 2
    err = capsys.readouterr().err
    assert "step-000004: model.safetensors is corrupt" in err and "--resume PATH" in err
    _untouched(run, before)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("other-model")
    build_tiny_llama(len(tiny_tokenizer), seed=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "change, field",
    [
        ("model", "model.fingerprint"),
        ("data", "data.train.sha256"),
        ("data.max_length=48", "data.max_length"),
        ("train.batch_size=2", "train.batch_size"),
        ("train.grad_accum=2", "train.grad_accum"),
        ("method.r=8", "method.r"),
        ("train.seed=5", "train.seed"),
    ],
)
def test_changed_run_is_refused_naming_the_field(run_copy, other_model_dir, change, field, capsys):
    run, cfg = run_copy
    before = (run / "metrics.jsonl").read_text()
    if change == "model":
        change = f"model.name={other_model_dir}"
    elif change == "data":
        changed = run.parent / "changed.jsonl"
        rows = (cfg.parent / "train.jsonl").read_text().splitlines()
        changed.write_text("\n".join(rows[:-1] + [rows[0]]) + "\n")
        change = f"data.train={changed}"
    assert _resume(cfg, run, change) == 2
    err = capsys.readouterr().err
    assert "resume refused" in err and f"  {field}" in err and "--allow-config-change" in err
    _untouched(run, before)


def test_allow_config_change_resumes_anyway(run_copy, caplog):
    run, cfg = run_copy
    assert (
        _resume(cfg, run, "data.max_length=48", "--allow-config-change", resume="step-000002") == 0
    )
    assert "data.max_length: checkpoint 64, now 48" in caplog.text
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps] == [1, 2, 3, 4, 4]  # four train records and one eval, none twice
    assert (run / "summary.json").is_file()


def test_resume_by_path_continues_from_that_checkpoint(run_copy, caplog):
    run, cfg = run_copy
    caplog.set_level(logging.INFO, logger="tuneforge")
    assert _resume(cfg, run, resume=str(run / "checkpoints" / "step-000002")) == 0
    err = caplog.text
    assert (
        "resuming from" in err and "(step 2)" in err and "removed checkpoints of steps [4]" in err
    )
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("spec", ["../../etc", "/etc", "%2e%2e/%2e%2e/etc", "step-000002/../../.."])
def test_resume_names_outside_the_checkpoints_dir_are_refused(run_copy, spec, capsys):
    run, cfg = run_copy
    assert _resume(cfg, run, resume=spec) == 2
    assert "must lie inside" in capsys.readouterr().err


def test_resume_through_a_symlink_out_is_refused(run_copy, tmp_path, capsys, caplog):
    run, cfg = run_copy
    outside = tmp_path / "elsewhere" / "step-000777"
    shutil.copytree(run / "checkpoints" / "step-000004", outside)
    (run / "checkpoints" / "step-000777").symlink_to(outside, target_is_directory=True)
    assert _resume(cfg, run, resume="step-000777") == 2
    assert "must lie inside" in capsys.readouterr().err
    caplog.set_level(logging.INFO, logger="tuneforge")
    assert _resume(cfg, run) == 0  # auto never follows the link: it takes step-000004
    assert "(step 4)" in caplog.text
