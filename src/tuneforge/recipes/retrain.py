"""The retrain recipe: continue the served adapter on old data + feedback, promote only if better.

One attempt: new feedback -> rows (held-out part kept back) -> a candidate run under
RUN_DIR/retrain/attempt-N -> both models scored on the original held-out set and the held-out
feedback -> `RUN_DIR/promoted` rewritten atomically only when neither got worse. Scheduling is
cron's or systemd's job (docs/feedback.md); serve follows the pointer.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tuneforge.config import load_config
from tuneforge.data.formats import Example, example_record, load_examples, write_jsonl
from tuneforge.data.pipeline import split_examples
from tuneforge.errors import FeedbackError, RunDirError
from tuneforge.feedback.export import build_export
from tuneforge.feedback.store import FeedbackStore
from tuneforge.paths import confined, write_json_atomic, write_text_atomic
from tuneforge.recipes.promotion import LABEL_GATES, decide, gate_checks, gated_label_metrics
from tuneforge.train.rundir import file_sha256, read_run

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

    from tuneforge.methods import Method

__all__ = ["RetrainJob", "RetrainOutcome", "decide", "policy_and_reference", "promoted_dir", "run_retrain"]  # fmt: skip

log = logging.getLogger("tuneforge")
POINTER = "promoted"  # RUN_DIR/promoted: one line, the promoted run dir relative to RUN_DIR


@dataclass
class RetrainJob:
    run_dir: Path
    db: str
    min_new: int = 20
    mix_old: float = 0.5  # share of old training rows in the candidate's training mix
    objective: str = "sft"  # sft | dpo | kto
    max_regression: float = 0.02  # relative loss increase allowed on either held-out set
    # largest absolute drop per label metric (accuracy, macro_f1); naming one also gates on it
    max_drop: dict[str, float] = field(default_factory=dict)
    holdout: float = 0.2  # share of the new feedback kept back to judge the candidate
    min_score: float = 0.75
    pii: str = "drop"
    steps: int | None = None  # training steps (default: the run's schedule; 20 for dpo/kto)
    beta: float = 0.1
    overrides: list[str] = field(default_factory=list)
    show_progress: bool = True


@dataclass
class RetrainOutcome:
    decision: str  # skipped | promoted | rejected
    reason: str
    attempt_dir: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    retrain_id: int | None = None


def promoted_dir(run_dir: str | Path) -> Path:
    """The run dir being served: the one `RUN_DIR/promoted` names, else RUN_DIR itself."""
    run_dir = Path(run_dir)
    pointer = run_dir / POINTER
    if not pointer.is_file():
        return run_dir
    return confined(run_dir, pointer.read_text(encoding="utf-8").strip())


def _check_job(job: RetrainJob) -> None:
    from tuneforge.loading import is_run_dir
    from tuneforge.train.preference import OBJECTIVES

    if not is_run_dir(job.run_dir):
        raise RunDirError(f"{job.run_dir}: not a tuneforge run directory (config.yaml / manifest.json missing)")  # fmt: skip
    checks = [
        (job.objective in OBJECTIVES, f"--objective: {job.objective!r} is not one of {', '.join(OBJECTIVES)}"),
        (0.0 <= job.mix_old < 1.0, f"--mix: old={job.mix_old} must be in [0, 1)"),
        (0.0 < job.holdout < 1.0, f"--holdout: {job.holdout} must be in (0, 1)"),
        (job.min_new >= 0, f"--min-new: {job.min_new} must be 0 or more"),
        (job.max_regression >= 0, f"--max-regression: {job.max_regression} must be 0 or more"),
        *((m in LABEL_GATES and 0 <= v <= 100, f"--max-drop: {m}={v} must name one of {', '.join(LABEL_GATES)} with a drop in [0, 100] percentage points")
          for m, v in job.max_drop.items()),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise FeedbackError(message)


def _history(store: FeedbackStore, root: Path, served: Path) -> tuple[int, int, int | None]:
    """(newest feedback id any attempt saw, newest a promoted attempt trained on, parent id)."""
    mine = [r for r in store.retrain_runs() if Path(r["parent_path"]).is_relative_to(root)]
    seen = [i for r in mine if r["decision"] != "failed" for i in r["feedback_ids"]]
    used = [i for r in mine if r["decision"] == "promoted" for i in r["feedback_ids"]]
    parent = [r["id"] for r in mine if r["candidate_path"] == str(served)]
    return max(seen, default=0), max(used, default=0), (parent[-1] if parent else None)


def _held_out(feedback_id: int, share: float) -> bool:
    digest = hashlib.sha256(f"feedback-{feedback_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < share


def _split_ids(ids: list[int], share: float) -> set[int]:
    """A stable held-out set of feedback ids (the same id is always on the same side)."""
    held = {i for i in ids if _held_out(i, share)}
    if len(ids) >= 2 and not held:
        held = {ids[-1]}
    if len(ids) >= 2 and held == set(ids):
        held.discard(ids[0])
    return held


def _old_data(config: dict[str, Any], seed: int) -> tuple[list[Example], list[Example]]:
    """The original run's training rows and its held-out (validation) rows, as it split them."""
    data = config["data"]
    examples = load_examples(data["train"], data.get("format", "auto"), "skip").examples
    validation = data.get("validation")
    if isinstance(validation, str):
        return examples, load_examples(validation, data.get("format", "auto"), "skip").examples
    if isinstance(validation, float | int) and not isinstance(validation, bool):
        return split_examples(examples, float(validation), seed)
    raise FeedbackError(
        f"{data['train']}: the run has no held-out set (data.validation: null); retrain needs one"
    )


def _mix(old: list[Example], new: list[dict[str, Any]], share: float, seed: int) -> list[dict]:
    """`new` plus old rows so that old rows are `share` of the mix (as many as there are)."""
    n_old = min(len(old), round(len(new) * share / (1 - share))) if share > 0 else 0
    picked = random.Random(seed).sample(old, n_old)
    rows = [*new, *(example_record(ex) for ex in picked)]
    random.Random(seed + 1).shuffle(rows)
    return rows


def _label_sets(sets: dict[str, list[Example]]) -> tuple[list[str] | None, dict[str, list[Example]]]:  # fmt: skip
    """The original held-out set's classes (None when it has fewer than two distinct answers)
    and the sets with label metrics: the original, and the feedback rows when every answer of
    theirs is one of those classes (each row labelled with its answer)."""
    labels = sorted({_answer(ex) for ex in sets.get("original", [])})
    if len(labels) < 2:
        return None, {}
    labelled = {"original": sets["original"]}
    feedback = sets.get("feedback", [])
    if feedback and all(_answer(ex) in labels for ex in feedback):
        labelled["feedback"] = [Example(messages=ex.messages, label=_answer(ex), source=ex.source) for ex in feedback]  # fmt: skip
    return labels, labelled


def _answer(example: Example) -> str:
    return example.label if example.label is not None else example.messages[-1]["content"]


def _evaluate(run: Path, sets: dict[str, list[Example]], label_metrics: list[str]) -> dict[str, dict[str, float]]:  # fmt: skip
    """Loss on every non-empty set; `label_metrics` (accuracy, macro_f1) where the set has labels."""
    from tuneforge.evaluation.runner import evaluate_examples
    from tuneforge.loading import load_run
    from tuneforge.models import resolve_dtype

    loaded = load_run(run, resolve_dtype("auto", "cpu"))
    labels, labelled = _label_sets(sets) if label_metrics else (None, {})
    out = {}
    for name, examples in sets.items():
        if not examples:
            continue
        gated = name in labelled
        out[name] = evaluate_examples(
            loaded.model, loaded.tokenizer, labelled.get(name, examples),
            ["loss", *label_metrics] if gated else ["loss"],
            positions_aligned=loaded.positions_aligned, labels=labels if gated else None,
        )  # fmt: skip
    return out


def run_retrain(job: RetrainJob) -> RetrainOutcome:
    """One attempt (or nothing, when fewer than `min_new` feedback rows arrived since the last)."""
    _check_job(job)
    root = job.run_dir.resolve()
    served = promoted_dir(root)
    store = FeedbackStore(job.db, create=False)
    try:
        return _attempt(job, store, root, served)
    finally:
        store.close()


def _attempt(job: RetrainJob, store: FeedbackStore, root: Path, served: Path) -> RetrainOutcome:
    seen, used, parent_id = _history(store, root, served)
    fresh = store.feedback(after_id=used)
    n_new = sum(f["id"] > seen for f in fresh)
    if n_new < job.min_new:
        return RetrainOutcome("skipped", f"{n_new} new feedback rows since the last attempt; --min-new is {job.min_new}")  # fmt: skip
    export = build_export(fresh, job.min_score, job.pii)
    held = _split_ids(sorted(f["id"] for f in fresh), job.holdout)
    kind = {"sft": "sft", "dpo": "pairs", "kto": "kto"}[job.objective]
    train_rows = [r for r in getattr(export, kind) if not held & set(r["feedback_ids"])]
    held_rows = [r for r in export.sft if set(r["feedback_ids"]) <= held]
    if not train_rows:
        return RetrainOutcome("skipped", f"no usable {kind} rows in {len(fresh)} feedback rows")
    config, _ = read_run(root)
    old_train, old_val = _old_data(config, config["train"].get("seed", 0))
    feedback_ids = sorted({i for r in train_rows for i in r["feedback_ids"]})
    run_id = store.start_retrain(parent_id=parent_id, parent_path=str(served), objective=job.objective,
                                 data_hashes={}, feedback_ids=feedback_ids)  # fmt: skip
    attempt = root / "retrain" / f"attempt-{run_id:04d}"
    try:
        outcome = _run_attempt(job, store, attempt, served, config, run_id,
                               (train_rows, held_rows, old_train, old_val, feedback_ids, kind))  # fmt: skip
    except BaseException as err:
        store.finish_retrain(
            run_id, decision="failed", reason=f"{type(err).__name__}: {err}"[:2000]
        )
        raise
    return outcome


def _run_attempt(job, store, attempt, served, config, run_id, data) -> RetrainOutcome:
    train_rows, held_rows, old_train, old_val, feedback_ids, kind = data
    files = attempt / "data"
    mix = _mix(old_train, train_rows, job.mix_old, run_id) if kind == "sft" else train_rows
    paths = {
        "train": write_jsonl(files / f"train-{kind}.jsonl", mix),
        "feedback_heldout": write_jsonl(files / "feedback-heldout.jsonl", held_rows),
        "original_heldout": write_jsonl(
            files / "original-heldout.jsonl", [example_record(e) for e in old_val]
        ),  # fmt: skip
    }
    hashes = {name: file_sha256(p) for name, p in paths.items()}
    dataset_id = store.record_export(kind, str(paths["train"]), hashes["train"], feedback_ids,
                                     {"objective": job.objective, "mix_old": job.mix_old})  # fmt: skip
    store.finish_retrain(run_id, decision="running", candidate_path=str(attempt / "candidate"),
                         dataset_id=dataset_id, data_hashes=hashes)  # fmt: skip
    candidate = attempt / "candidate"
    if job.objective == "sft":
        _train_sft(job, config, served, paths["train"], candidate)
    else:
        _train_preference(job, config, served, train_rows, candidate)
    sets = {"original": old_val, "feedback": [_as_example(r) for r in held_rows]}
    gated = gated_label_metrics(config.get("eval", {}).get("metrics") or [], job.max_drop)
    metrics: dict[str, Any] = {"parent": _evaluate(served, sets, gated), "candidate": _evaluate(candidate, sets, gated)}  # fmt: skip
    limits = (job.max_regression, job.max_drop, gated)
    promote, reason = decide(metrics["parent"], metrics["candidate"], *limits)
    metrics["gates"] = gate_checks(metrics["parent"], metrics["candidate"], *limits)
    decision = "promoted" if promote else "rejected"
    write_json_atomic(attempt / "decision.json", {"id": run_id, "parent": str(served), "decision": decision,
                      "reason": reason, "metrics": metrics, "data_hashes": hashes, "feedback_ids": feedback_ids})  # fmt: skip
    if promote:
        write_text_atomic(
            job.run_dir / POINTER, str(candidate.relative_to(job.run_dir.resolve())) + "\n"
        )
    store.finish_retrain(run_id, decision=decision, reason=reason, metrics=metrics)
    log.info("retrain attempt %d: %s (%s)", run_id, decision, reason)
    return RetrainOutcome(decision, reason, attempt, metrics, run_id)


def _as_example(row: dict[str, Any]) -> Example:
    return Example(messages=row["messages"], source="feedback")


def _candidate_config(job: RetrainJob, config: dict, train: Path, out: Path) -> Path:
    """The parent's config with the mixed data, no in-run evaluation and its own output dir."""
    cfg = {**config}
    cfg["data"] = {**config["data"], "train": str(train), "validation": None}
    cfg["eval"] = {**config.get("eval", {}), "every_steps": None, "early_stopping": None}
    cfg["checkpoint"] = {**config.get("checkpoint", {}), "every_steps": None}
    cfg["log"] = {**config.get("log", {}), "report": False, "tensorboard": False}
    cfg["output"] = {"dir": str(out), "overwrite": False}
    if job.steps is not None:
        cfg["train"] = {**config["train"], "max_steps": job.steps}
    path = out.parent / "candidate-config.yaml"
    write_text_atomic(path, yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def _train_sft(job: RetrainJob, config: dict, served: Path, train: Path, out: Path) -> None:
    from tuneforge.recipes.train import run_training

    full = (served / "model" / "config.json").is_file()  # a full fine-tune continues its weights
    # An adapter run continues the served adapter through method.init_from (shape-checked).
    extra = [f"model.name={served / 'model'}"] if full else [f"method.init_from={served}"]
    cfg = load_config(_candidate_config(job, config, train, out), [*job.overrides, *extra])
    run_training(cfg, show_progress=job.show_progress)


def policy_and_reference(method: Method, base: torch.nn.Module, adapter: Path) -> PeftModel:
    """The served adapter twice on one `base`, both through `method.load`: "default" trainable
    (the policy) and "reference" frozen. The base weights are the same tensors for both."""
    model = method.load(base, str(adapter), trainable=True)
    model = method.load(model, str(adapter), name="reference", trainable=False)
    model.set_adapter("default")
    return model


def _train_preference(job, config: dict, served: Path, rows: list[dict], out: Path) -> None:
    """DPO / KTO from the served adapter, with the same adapter frozen as the reference."""
    from tuneforge.loading import run_method
    from tuneforge.models import load_model, load_tokenizer, resolve_dtype
    from tuneforge.train.preference import PreferenceSettings, train_preference

    adapter = served / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FeedbackError(f"--objective {job.objective}: {served} has no adapter/ (full fine-tunes retrain with sft)")  # fmt: skip
    served_config, manifest = read_run(served)
    method = run_method(served_config)
    if method.adds_virtual_tokens:
        raise FeedbackError(f"--objective {job.objective}: method {method.name} adds virtual tokens, which the preference losses do not handle; retrain it with --objective sft")  # fmt: skip
    base = load_model(Path(manifest["base_model"]["dir"]), resolve_dtype("auto", "cpu"))
    model = policy_and_reference(method, base, adapter)
    tokenizer = load_tokenizer(served / "tokenizer")
    settings = PreferenceSettings(objective=job.objective, beta=job.beta, lr=float(config["train"]["lr"]),
                                  steps=job.steps or 20, batch_size=int(config["train"]["batch_size"]),
                                  max_length=int(config["data"]["max_length"]))  # fmt: skip
    losses = train_preference(model, tokenizer, rows, settings, job.show_progress)
    stage = out.with_name(out.name + ".tmp")
    shutil.rmtree(stage, ignore_errors=True)
    for name in ("config.yaml", "manifest.json"):
        stage.mkdir(parents=True, exist_ok=True)
        shutil.copy2(served / name, stage / name)
    shutil.copytree(served / "tokenizer", stage / "tokenizer")
    model.save_pretrained(
        str(stage / "adapter"), selected_adapters=["default"], safe_serialization=True
    )
    write_json_atomic(
        stage / "summary.json", {"objective": job.objective, "losses": losses, "steps": len(losses)}
    )
    stage.rename(out)
