"""Cross-validation: seeded folds that are disjoint and cover the data, and `tuneforge cv` end to end."""

from __future__ import annotations

import json
import statistics

import pytest

from tuneforge.cli import main
from tuneforge.recipes.cv import aggregate, fold_indices

from helpers import write_run_config, write_toy_messages


@pytest.mark.parametrize("n,k", [(10, 2), (10, 3), (64, 5), (7, 7), (101, 10)])
def test_folds_are_disjoint_cover_the_data_and_are_balanced(n, k):
    folds = fold_indices(n, k, seed=3)
    assert len(folds) == k
    flat = [i for fold in folds for i in fold]
    assert sorted(flat) == list(range(n))  # each index exactly once
    assert max(map(len, folds)) - min(map(len, folds)) <= 1


def test_folds_depend_on_the_seed_only():
    assert fold_indices(50, 5, seed=1) == fold_indices(50, 5, seed=1)
    assert fold_indices(50, 5, seed=1) != fold_indices(50, 5, seed=2)
    assert fold_indices(50, 5, seed=1) != [list(range(i, 50, 5)) for i in range(5)]  # shuffled


def test_bad_fold_counts_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        fold_indices(10, 1, 0)
    with pytest.raises(ValueError, match="3 usable rows cannot make 4"):
        fold_indices(3, 4, 0)


def test_aggregate_is_mean_and_sample_std():
    per_fold = [{"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 2.0}, {"a": 6.0}]
    out = aggregate(per_fold)
    assert out["mean"] == {"a": 3.0}  # b is not in every fold
    assert out["std"]["a"] == pytest.approx(statistics.stdev([1.0, 2.0, 6.0]))


def test_cv_command_trains_one_run_per_fold(tmp_path, tiny_model_dir, capsys):
    data = write_toy_messages(tmp_path / "train.jsonl", n=30)
    cfg = write_run_config(
        tmp_path / "cv.yaml",
        tiny_model_dir,
        data,
        tmp_path / "cv",
        train={"max_steps": 2},
        eval={"every_steps": None},
        log={"report": False},
    )
    assert main(["cv", str(cfg), "--folds", "3", "--quiet"]) == 0
    out_dir = tmp_path / "cv"
    result = json.loads((out_dir / "cv.json").read_text())
    assert result["folds"] == 3 and len(result["per_fold"]) == 3

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    seen = []
    for k in (1, 2, 3):
        train = (out_dir / "folds" / f"fold-{k}-train.jsonl").read_text().splitlines()
        val = (out_dir / "folds" / f"fold-{k}-validation.jsonl").read_text().splitlines()
        train_rows, val_rows = [json.loads(x) for x in train], [json.loads(x) for x in val]
        assert len(train_rows) + len(val_rows) == len(rows)
        assert sorted(map(json.dumps, train_rows + val_rows)) == sorted(map(json.dumps, rows))
        seen += val
        summary = json.loads((out_dir / f"fold-{k}" / "summary.json").read_text())
        manifest = json.loads((out_dir / f"fold-{k}" / "manifest.json").read_text())
        assert manifest["data"]["train_size"] == len(train_rows)
        assert manifest["data"]["validation_size"] == len(val_rows)
        assert result["per_fold"][k - 1]["metrics"]["eval_loss"] == summary["eval"]["eval_loss"]
    # validation folds are disjoint and together are the whole file (rows may repeat in the data)
    assert sorted(seen) == sorted(data.read_text().splitlines())
    losses = [f["metrics"]["eval_loss"] for f in result["per_fold"]]
    assert result["mean"]["eval_loss"] == pytest.approx(statistics.fmean(losses))
    assert result["std"]["eval_loss"] == pytest.approx(statistics.stdev(losses))
    printed = capsys.readouterr().out
    assert "eval_loss" in printed and "±" in printed and "fold-3" in printed
