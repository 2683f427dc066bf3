"""`tuneforge retrain --objective kto|dpo` end to end on the tiny model, and the reference policy
loaded through `Method.load` for every adapter method that can be one (base weights shared).

KTO learns from thumbs alone (no corrections); DPO from corrections against the served answers.
Each test checks the first step's loss by hand, that the candidate's adapter moved away from the
parent in the objective's direction, and the recorded promotion decision.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.cli import main as cli
from tuneforge.config import options_model
from tuneforge.data.pipeline import collate
from tuneforge.feedback.store import FeedbackStore
from tuneforge.feedback.validate import FeedbackItem
from tuneforge.loading import load_run
from tuneforge.methods import build_method
from tuneforge.models import resolve_dtype
from tuneforge.recipes.retrain import policy_and_reference
from tuneforge.train.preference import answer_logps, tokenize_answer

from conftest import build_tiny_llama
from feedback_helpers import make_record
from helpers import COLORS, THINGS

ANSWER = {t: COLORS[i % len(COLORS)] for i, t in enumerate(THINGS)}


def _serve(store: FeedbackStore, thing: str, answer: str) -> str:
    rec = make_record(f"Color of {thing}?", answer)
    store.write(rec)
    return rec.id


def _logps(run, rows: list[tuple[list[dict], str]]) -> torch.Tensor:
    """Summed answer log-probabilities of (prompt, answer) rows under a run dir's model."""
    loaded = load_run(run, resolve_dtype("auto", "cpu"))
    items = [tokenize_answer(loaded.tokenizer, p, a) for p, a in rows]
    with torch.no_grad():
        return answer_logps(loaded.model, collate(items, loaded.tokenizer.pad_token_id))


def _adapters_differ(parent, candidate) -> float:
    a = load_file(parent / "adapter" / "adapter_model.safetensors")
    b = load_file(candidate / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _decision(store: FeedbackStore, attempt) -> dict:
    [row] = store.retrain_runs()
    record = json.loads((attempt / "decision.json").read_text())
    assert row["decision"] == record["decision"] and row["decision"] in ("promoted", "rejected")
    assert row["metrics"] == record["metrics"] and row["reason"] == record["reason"]
    assert (attempt.parent.parent / "promoted").is_file() == (row["decision"] == "promoted")
    return row


def _retrain(run, db, *extra: str) -> None:
    argv = ["retrain", str(run), "--db", db, "--min-new", "5", "--quiet", *extra]
    assert cli(argv) == 0


def test_kto_from_thumbs_only(parent_copy, tmp_path, one_thread, capsys):
    db = f"sqlite:///{tmp_path / 'fb.db'}"
    store = FeedbackStore(db)
    for i in range(24):  # every other answer right (thumbs up), the rest wrong (thumbs down)
        thing = THINGS[i % len(THINGS)]
        good = i % 2 == 0
        rid = _serve(store, thing, ANSWER[thing] if good else "purple")
        store.add_feedback(FeedbackItem(rid, 1 if good else -1, "thumbs"))
    _retrain(parent_copy, db, "--objective", "kto", "--steps", "8", "--beta", "0.5")
    attempt = parent_copy / "retrain" / "attempt-0001"
    row = _decision(store, attempt)
    assert row["objective"] == "kto"
    assert f"{row['decision']}:" in capsys.readouterr().out
    rows = [json.loads(x) for x in (attempt / "data" / "train-kto.jsonl").read_text().splitlines()]
    assert {r["label"] for r in rows} == {True, False}
    assert all(r["label"] == (r["completion"] != "purple") for r in rows)
    candidate = attempt / "candidate"
    summary = json.loads((candidate / "summary.json").read_text())
    # step 1: policy == frozen reference, KL point 0: 1 - sigmoid(0) for every row
    assert summary["objective"] == "kto" and summary["losses"][0] == pytest.approx(0.5, abs=1e-5)
    assert _adapters_differ(parent_copy, candidate) > 1e-4
    pairs = [(r["prompt"], r["completion"]) for r in rows]
    ratio = _logps(candidate, pairs) - _logps(parent_copy, pairs)  # log pi_candidate / pi_parent
    good = torch.tensor([r["label"] for r in rows])
    assert ratio[good].mean() > 0 > ratio[~good].mean()
    store.close()


def test_dpo_through_the_cli_raises_the_margin(parent_copy, tmp_path, one_thread):
    db = f"sqlite:///{tmp_path / 'fb.db'}"
    store = FeedbackStore(db)
    for i in range(16):  # wrong answers with the right one as the correction
        thing = THINGS[i % len(THINGS)]
        rid = _serve(store, thing, "purple")
        store.add_feedback(FeedbackItem(rid, -1, "thumbs", correction=ANSWER[thing]))
    _retrain(parent_copy, db, "--objective", "dpo", "--steps", "6")
    attempt = parent_copy / "retrain" / "attempt-0001"
    row = _decision(store, attempt)
    assert row["objective"] == "dpo"
    candidate = attempt / "candidate"
    summary = json.loads((candidate / "summary.json").read_text())
    assert summary["losses"][0] == pytest.approx(math.log(2), abs=1e-5)  # margin 0 at step 1
    assert _adapters_differ(parent_copy, candidate) > 1e-4
    pairs = [json.loads(x) for x in (attempt / "data" / "train-pairs.jsonl").read_text().splitlines()]  # fmt: skip
    assert pairs and all(p["rejected"] == "purple" for p in pairs)

    def margin(run):
        chosen = _logps(run, [(p["prompt"], p["chosen"]) for p in pairs])
        return (chosen - _logps(run, [(p["prompt"], p["rejected"]) for p in pairs])).mean().item()

    assert margin(candidate) > margin(parent_copy) + 1e-3
    store.close()


def test_prompt_learning_runs_are_refused_for_preference_objectives(parent_copy, tmp_path, one_thread, capsys):  # fmt: skip
    import yaml

    config = yaml.safe_load((parent_copy / "config.yaml").read_text())
    config["method"] = {"name": "prefix", "num_virtual_tokens": 4}
    (parent_copy / "config.yaml").write_text(yaml.safe_dump(config))
    db = f"sqlite:///{tmp_path / 'fb.db'}"
    store = FeedbackStore(db)
    for i in range(8):
        thing = THINGS[i % len(THINGS)]
        store.add_feedback(FeedbackItem(_serve(store, thing, "purple"), -1, "thumbs"))
    argv = [
        "retrain",
        str(parent_copy),
        "--db",
        db,
        "--min-new",
        "5",
        "--objective",
        "kto",
        "--quiet",
    ]
    assert cli(argv) == 2
    assert "method prefix adds virtual tokens" in capsys.readouterr().err
    [row] = store.retrain_runs()
    assert row["decision"] == "failed" and "virtual tokens" in row["reason"]
    assert not (parent_copy / "promoted").exists()
    store.close()


METHODS = [
    {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "dora": True},
    {"name": "ia3"},
    {"name": "adalora", "init_r": 4, "target_r": 2, "target_modules": ["q_proj", "v_proj"]},
]


@pytest.mark.parametrize("options", METHODS, ids=["lora", "dora", "ia3", "adalora"])
def test_reference_through_method_load_shares_the_base(options, tmp_path, tiny_tokenizer, one_thread):  # fmt: skip
    method = build_method(options_model(options["name"]).model_validate(options))
    method.plan(10)
    torch.manual_seed(0)
    trained = method.apply(build_tiny_llama(len(tiny_tokenizer)))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # a served adapter that is not the identity
    method.save(trained, str(tmp_path / "adapter"))

    base = build_tiny_llama(len(tiny_tokenizer))
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    n_base = sum(p.numel() for p in base.parameters())
    model = policy_and_reference(method, base, tmp_path / "adapter")
    named = dict(model.named_parameters())
    mine = {n: p for n, p in named.items() if ".default" in n}
    ref = {n: p for n, p in named.items() if ".reference" in n}
    shared = {n: p for n, p in named.items() if n not in mine and n not in ref}
    assert {p.data_ptr() for p in shared.values()} == base_ptrs  # the same tensors, no copy
    assert sum(p.numel() for p in shared.values()) == n_base
    assert sorted(n.replace(".reference", ".default") for n in ref) == sorted(mine)
    assert not any(p.requires_grad for p in ref.values())
    assert any(p.requires_grad for p in mine.values())
    for n, p in ref.items():
        assert torch.equal(p, named[n.replace(".reference", ".default")])
    assert model.active_adapter == "default"
    ids = torch.tensor([[5, 9, 13, 7, 2, 11]])
    model.eval()
    with torch.no_grad():
        policy = model(input_ids=ids).logits
        model.set_adapter("reference")
        reference = model(input_ids=ids).logits
        model.set_adapter("default")
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert torch.equal(policy, reference) and not torch.allclose(policy, plain, atol=1e-4)
