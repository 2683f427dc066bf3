"""`tuneforge compare` without training: specs, per-run configs, the validation file, the table and
the marked block in the Markdown file (the real runs are measured, not tested)."""

import json

import pytest

from tuneforge.cli import main
from tuneforge.config import build_config
from tuneforge.methods import method_names
from tuneforge.recipes.compare import (
    BEGIN,
    END,
    default_specs,
    markdown_table,
    parse_spec,
    run_config,
    validation_file,
    write_doc,
)

from helpers import write_toy_messages


def test_specs_split_method_and_train_keys():
    method, train = parse_spec("lora:dora=true:r=8:train.lr=3e-4")
    assert method == {"name": "lora", "dora": True, "r": 8}
    assert train == {"lr": 3e-4}
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("lora:dora")


def test_every_default_spec_is_a_valid_run(tmp_path):
    base = {"train": {"max_steps": 60, "batch_size": 8}, "method": {"name": "lora", "r": 16}}
    names = set()
    for spec in default_specs():
        cfg = build_config(run_config(base, spec, tmp_path / "x", steps=30))
        names.add(cfg.method.name)
        assert cfg.train.max_steps == 30 and cfg.train.batch_size == 8
        assert cfg.eval.every_steps is None and cfg.output.overwrite
    assert names == set(method_names())  # every registered method has a default spec
    # the method section is replaced whole: LoRA's r does not leak into prefix
    assert build_config(run_config(base, "prefix", tmp_path, None)).method.name == "prefix"


def test_validation_file_is_the_split_training_makes(tmp_path, tiny_tokenizer):
    from tuneforge.data.pipeline import prepare_data

    data = write_toy_messages(tmp_path / "train.jsonl", n=40)
    base = {"data": {"train": str(data), "validation": 0.25}, "train": {"seed": 3}}
    path = validation_file(base, tmp_path)
    prepared = prepare_data(data, 0.25, tiny_tokenizer, seed=3)
    from_file = prepare_data(path, None, tiny_tokenizer).train
    assert [e.input_ids for e in from_file] == [e.input_ids for e in prepared.validation]


def test_table_and_marked_block(tmp_path):
    summary = {
        "trainable_params": 10,
        "total_params": 1000,
        "peak_memory_mb": 512.4,
        "tokens_per_s": 99.6,
        "train_runtime_s": 12.2,
        "eval": {"eval_loss": 0.25},
    }
    table = markdown_table(
        {"loss": 1.5, "accuracy": 50.0},
        [{"spec": "lora", "summary": summary, "test": {"accuracy": 82.5}}],
    )
    assert "| `lora` | 10 (1 %) | 512 | 100 | 12 | 0.2500 | 82.5 | +32.5 |" in table
    assert "| base model (no training) | 0 | – | – | – | 1.5000 | 50.0 | – |" in table
    doc = tmp_path / "methods.md"
    doc.write_text(f"# Methods\n\nprose before\n\n{BEGIN}\nold\n{END}\n\nprose after\n")
    write_doc(doc, table)
    text = doc.read_text()
    assert "prose before" in text and "prose after" in text and "old" not in text
    assert text.count(BEGIN) == 1 and "82.5" in text


def test_a_bad_spec_fails_before_anything_runs(tmp_path, capsys):
    cfg = tmp_path / "base.yaml"
    cfg.write_text(json.dumps({"train": {"max_steps": 2}}))
    out = tmp_path / "out"
    args = ["compare", str(cfg), "--methods", "lora:rank=8", "--test", "t.jsonl", "--out", str(out)]
    assert main(args) == 2
    assert "--methods lora:rank=8" in capsys.readouterr().err
    assert not out.exists()
