"""The post-export quality re-check: every artefact scored on the same held-out ids as the model it
came from, with size, load time, peak RSS, tokens/s and each metric's delta; regressions fail it.

Each artefact is probed in its own process (probe.py); choosing artefacts and data is the recipe's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tuneforge.errors import ExportError
from tuneforge.evaluation.metrics import classification_report, perplexity
from tuneforge.evaluation.score import META_KEY, score_texts
from tuneforge.export.evalset import EvalSet
from tuneforge.reporting.tables import fmt_number, text_table

#: Metrics --max-regression may bound; True where higher is better.
HIGHER_IS_BETTER = {
    "loss": False,
    "perplexity": False,
    "accuracy": True,
    "macro_f1": True,
    **dict.fromkeys(("bleu", "chrf", "rouge1", "rouge2", "rougeL"), True),
}
LABEL_ONLY = ("accuracy", "macro_f1")
TEXT_ONLY = ("bleu", "chrf", "rouge1", "rouge2", "rougeL")


@dataclass
class Artefact:
    name: str  # e.g. "gguf-q4_k_m"
    kind: str  # a probe kind: run, hf, nf4, gguf
    path: Path
    size_bytes: int
    lora: Path | None = None  # a GGUF adapter applied over a GGUF base


def parse_max_regression(items: list[str]) -> dict[str, float]:
    """["loss=0.05", "accuracy=2"] -> {"loss": 0.05, "accuracy": 2.0}."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            delta = float(value)
        except ValueError:
            delta = math.nan
        if not sep or name not in HIGHER_IS_BETTER or not math.isfinite(delta) or delta < 0:
            raise ExportError(
                f"--max-regression {item!r}: expected METRIC=DELTA with METRIC one of "
                f"{', '.join(HIGHER_IS_BETTER)} and DELTA a number >= 0"
            )
        out[name] = delta
    return out


def check_measurable(limits: dict[str, float], evalset: EvalSet, *, text: bool = True) -> None:
    """ExportError naming each bounded metric the re-check cannot measure on this data (accuracy
    without labels, BLEU without generation prompts or a tokenizer to decode the answers)."""
    missing = [
        m
        for m in limits
        if m not in HIGHER_IS_BETTER
        or (m in LABEL_ONLY and not evalset.labels)
        or (m in TEXT_ONLY and not (evalset.gen_prompts and text))
    ]
    if missing:
        raise ExportError(f"--max-regression: {', '.join(missing)} is not measured on this data")


def run_probe(
    artefact: Artefact, evalset_path: Path, *, dtype: str, threads: int, new_tokens: int
) -> dict[str, Any]:
    """Probe one artefact in a fresh Python process; its JSON result."""
    with tempfile.TemporaryDirectory(prefix="tuneforge-probe-") as tmp:
        out = Path(tmp) / "probe.json"
        cmd = [sys.executable, "-m", "tuneforge.export.probe", artefact.kind, str(artefact.path)]
        cmd += [str(evalset_path), str(out), "--dtype", dtype, "--threads", str(threads)]
        cmd += ["--new-tokens", str(new_tokens)]
        if artefact.lora is not None:
            cmd += ["--lora", str(artefact.lora)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": f"probe exited {proc.returncode}: {tail[0]}"}
        return json.loads(out.read_text(encoding="utf-8"))


def metrics_from(
    raw: dict[str, Any], evalset: EvalSet, decode: Callable[[list[int]], str] | None = None
) -> dict[str, float]:
    """Loss and perplexity from token log-probs; accuracy and macro-F1 from answer scores;
    BLEU, chrF and ROUGE from the greedy answers (decoded by the run's tokenizer)."""
    total, count = 0.0, 0
    for logp, mask in zip(raw["logprobs"], evalset.loss_masks, strict=True):
        scored = [lp for lp, on in zip(logp, mask[1:], strict=True) if on]
        total -= sum(scored)
        count += len(scored)
    loss = total / count if count else math.nan
    out = {"loss": loss, "perplexity": perplexity(loss)}
    if evalset.labels:
        preds = [
            evalset.labels[max(range(len(r)), key=r.__getitem__)] for r in raw["answer_scores"]
        ]
        out.update(classification_report(preds, evalset.refs, evalset.labels))
    if evalset.gen_prompts and decode is not None:
        texts = [decode(ids).strip() for ids in raw["generations"]]
        scores = score_texts(texts, evalset.gen_refs, ["bleu", "chrf", "rouge"])
        out.update({k: v for k, v in scores.items() if k != META_KEY})
    return out


def _agreement(greedy: list[int], reference: list[int]) -> int:
    """How many greedy tokens match the reference's before the first difference."""
    n = 0
    for a, b in zip(greedy, reference, strict=False):
        if a != b:
            break
        n += 1
    return n


def _entry(
    artefact: Artefact, raw: dict[str, Any], evalset: EvalSet, decode: Callable | None
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": artefact.name,
        "kind": artefact.kind,
        "path": str(artefact.path),
        "size_mb": artefact.size_bytes / 2**20,
    }
    if "error" in raw:
        return {**entry, "status": "failed", "failures": [raw["error"]]}
    entry.update(
        load_s=raw["load_s"],
        peak_rss_mb=raw["peak_rss_mb"],
        gen_tokens_per_s=len(raw["greedy"]) / raw["gen_s"] if raw["gen_s"] > 0 else None,
        greedy=raw["greedy"],
        metrics=metrics_from(raw, evalset, decode),
        status="ok",
        failures=[],
    )
    if "tokenizer_matches" in raw:
        matches = raw["tokenizer_matches"]
        entry["tokenizer_agreement"] = sum(matches) / len(matches) if matches else None
    return entry


def _judge(entry: dict[str, Any], ref: dict[str, Any], limits: dict[str, float]) -> None:
    """Deltas against the reference; failures where a bound in `limits` is exceeded."""
    entry["deltas"] = {k: v - ref["metrics"][k] for k, v in entry["metrics"].items()}
    entry["greedy_agreement"] = _agreement(entry["greedy"], ref["greedy"])
    for name, bound in limits.items():
        delta = entry["deltas"][name]
        lost = -delta if HIGHER_IS_BETTER[name] else delta
        if lost > bound:
            entry["failures"].append(f"{name} regressed by {lost:.4f} > {bound}")
    if entry.get("tokenizer_agreement", 1.0) not in (None, 1.0):
        entry["failures"].append("llama.cpp tokenises the held-out text differently")
    entry["status"] = "failed" if entry["failures"] else "ok"


def recheck(
    reference: Artefact,
    artefacts: list[Artefact],
    evalset: EvalSet,
    *,
    dtype: str = "auto",
    threads: int | None = None,
    new_tokens: int = 32,
    max_regression: dict[str, float] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> dict[str, Any]:
    """The export.json report: the reference first, then each artefact with deltas and status.

    `decode` (the run's tokenizer) turns greedy answers into text for BLEU/chrF/ROUGE on
    generation data; without it those metrics are not measured.
    """
    limits = max_regression or {}
    threads = threads or max(1, len(os.sched_getaffinity(0)))
    check_measurable(limits, evalset, text=decode is not None)
    entries = []
    with tempfile.TemporaryDirectory(prefix="tuneforge-evalset-") as tmp:
        path = Path(tmp) / "evalset.json"
        evalset.save(path)
        for art in tqdm([reference, *artefacts], desc="re-check", unit="artefact"):
            raw = run_probe(art, path, dtype=dtype, threads=threads, new_tokens=new_tokens)
            entries.append(_entry(art, raw, evalset, decode))
    ref = entries[0]
    if ref["status"] != "ok":
        raise ExportError(f"the reference model could not be evaluated: {ref['failures'][0]}")
    ref["status"] = "reference"
    for entry in entries[1:]:
        if entry["status"] == "ok":
            _judge(entry, ref, limits)
    return {
        "data": evalset.source,
        "examples": len(evalset.sequences),
        "dtype": dtype,
        "threads": threads,
        "new_tokens": new_tokens,
        "max_regression": limits,
        "artefacts": entries,
        "passed": all(e["status"] != "failed" for e in entries),
    }


def report_table(report: dict[str, Any]) -> str:
    """One row per artefact: size, load, RSS, tokens/s, each metric with its delta, status."""
    names = [m for m in HIGHER_IS_BETTER if m in (report["artefacts"][0].get("metrics") or {})]
    rows = [["artefact", "size MB", "load s", "peak RSS MB", "gen tok/s", *names, "status"]]
    for e in report["artefacts"]:
        cells = [e["name"], f"{e['size_mb']:.1f}"]
        cells += [fmt_number(e.get(k)) for k in ("load_s", "peak_rss_mb", "gen_tokens_per_s")]
        for name in names:
            value = (e.get("metrics") or {}).get(name)
            delta = (e.get("deltas") or {}).get(name)
            cells.append(fmt_number(value) + (f" ({delta:+.4f})" if delta is not None else ""))
        cells.append(e["status"] + ("".join(f"; {f}" for f in e.get("failures", []))))
        rows.append(cells)
    return text_table(rows)
