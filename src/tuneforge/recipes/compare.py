"""`tuneforge compare`: run several methods on one task and budget, and write a table of the results.

Each method trains in its own process (so peak memory is its own) from the same base config with
only the method section (and, where a spec says so, train keys) replaced, then is evaluated on a
test file beside the base model. The table goes between markers in a Markdown file; the prose
around it is left alone. Choosing methods and rates is the caller's; nothing here trains itself.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tuneforge.config import build_config, load_config
from tuneforge.data.formats import load_examples
from tuneforge.errors import ConfigError

BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"


def default_specs() -> list[str]:
    """Every registered method's own line-up (`Method.compare_specs`), in registry order."""
    from tuneforge.methods import method_class, method_names

    return [
        f"{name}:{spec}" for name in method_names() for spec in method_class(name).compare_specs
    ]


def parse_spec(spec: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`NAME[:key=value...]` -> (method section, train overrides); `train.KEY` keys go to train."""
    name, *pairs = spec.split(":")
    method: dict[str, Any] = {"name": name.strip()}
    train: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"{pair!r} must look like key=value")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if key.startswith("train."):
            train[key.removeprefix("train.")] = value
        else:
            method[key] = value
    return method, train


def slug(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.replace(":", "-"))


def run_config(base: dict[str, Any], spec: str, run_dir: Path, steps: int | None) -> dict:
    """The base config with this spec's method and train keys, writing into `run_dir`."""
    method, train = parse_spec(spec)
    cfg = json.loads(json.dumps(base))
    cfg["method"] = method
    cfg["train"] = {**cfg.get("train", {}), **train, **({"max_steps": steps} if steps else {})}
    cfg["eval"] = {**cfg.get("eval", {}), "every_steps": None}
    cfg["checkpoint"] = {"every_steps": None}
    cfg["output"] = {"dir": str(run_dir), "overwrite": True}
    cfg.setdefault("log", {})["report"] = False
    return cfg


def _cli(args: list[str], log_file: Path) -> None:
    """Run `tuneforge ARGS` in a fresh process (its own peak memory), output to `log_file`."""
    with log_file.open("w") as log:
        code = subprocess.call(
            [sys.executable, "-m", "tuneforge.cli", *args], stdout=log, stderr=subprocess.STDOUT
        )
    if code != 0:
        raise RuntimeError(f"tuneforge {' '.join(args)} failed ({code}); see {log_file}")


def evaluate(ref: str, data: str, out: Path, metrics: str, limit: int | None) -> dict[str, Any]:
    """`tuneforge eval` in its own process; the result is cached in `out`."""
    if not out.is_file():
        args = ["eval", "--model", ref, "--data", data, "--metrics", metrics, "--output", str(out)]
        _cli(args + (["--limit", str(limit)] if limit else []), out.with_suffix(".log"))
    return next(iter(json.loads(out.read_text()).values()))


def validation_file(base: dict[str, Any], out: Path) -> Path:
    """The run's held-out validation rows as a file (the same seeded split training makes), so
    that the base model's loss is measured on exactly the rows each run's eval_loss uses."""
    from tuneforge.data.formats import write_examples_jsonl
    from tuneforge.data.pipeline import split_examples

    data, seed = base.get("data", {}), base.get("train", {}).get("seed", 0)
    ratio = data.get("validation", 0.1)
    if not isinstance(ratio, float):
        raise ConfigError("data.validation: compare needs a ratio (the runs' eval loss set)")
    examples = load_examples(data["train"], data.get("format", "auto"), "fail").examples
    _, held_out = split_examples(examples, ratio, seed)
    return write_examples_jsonl(out / "validation.jsonl", held_out)


def compare_one(base: dict, spec: str, out: Path, test: str, steps, limit) -> dict[str, Any]:
    """Train one spec (its eval_loss is on the validation split) and score test accuracy; a
    finished run or score in `out/SLUG` is reused."""
    work = out / slug(spec)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    if not (run_dir / "summary.json").is_file():
        cfg_path = work / "run.yaml"
        cfg_path.write_text(yaml.safe_dump(run_config(base, spec, run_dir, steps)))
        _cli(["train", str(cfg_path), "--quiet"], work / "train.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    test_scores = evaluate(str(run_dir), test, work / "accuracy.json", "accuracy", limit)
    return {"spec": spec, "summary": summary, "test": test_scores}


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{cpu}, {os.cpu_count()} cores, {device}; torch {torch.__version__}"


def markdown_table(base: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | trainable params | peak memory (MB) | tokens/s | train time (s) "
        "| eval loss | test accuracy (%) | Δ accuracy vs base (points) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    acc0 = base["accuracy"]
    lines = [f"| base model (no training) | 0 | – | – | – | {base['loss']:.4f} | {acc0:.1f} | – |"]
    for row in rows:
        s, acc = row["summary"], row["test"]["accuracy"]
        share = 100 * s["trainable_params"] / s["total_params"]
        lines.append(
            f"| `{row['spec']}` | {s['trainable_params']:,} ({share:.3g} %) | "
            f"{s['peak_memory_mb']:.0f} | {s['tokens_per_s']:.0f} | {s['train_runtime_s']:.0f} | "
            f"{s['eval']['eval_loss']:.4f} | {acc:.1f} | {acc - acc0:+.1f} |"
        )
    return head + "\n".join(lines) + "\n"


def write_doc(doc: Path, block: str) -> None:
    """Replace the marked block in `doc` (append it, or create the file, when absent)."""
    text = doc.read_text() if doc.is_file() else "# Methods\n\n"
    block = f"{BEGIN}\n{block}{END}"
    if BEGIN in text and END in text:
        start, end = text.index(BEGIN), text.index(END) + len(END)
        text = text[:start] + block + text[end:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


@dataclass
class CompareJob:
    """What `tuneforge compare` was asked: the base config, the specs, where to write."""

    config: str
    test: str
    methods: str | None = None  # comma-separated specs; None: default_specs()
    out: Path = Path("runs/compare")
    doc: Path = Path("docs/methods.md")
    steps: int | None = None
    limit: int | None = None
    threads: int | None = None


def run_compare(job: CompareJob) -> int:
    """Train and score every spec (finished ones reused); 1 if any failed, else 0."""
    load_config(job.config)  # a missing or broken base config fails here, naming the key
    base = yaml.safe_load(Path(job.config).read_text(encoding="utf-8")) or {}
    specs = [s.strip() for s in (job.methods.split(",") if job.methods else default_specs())]
    for spec in specs:  # every spec must validate before hours of training start
        try:
            build_config(run_config(base, spec, job.out / slug(spec), job.steps))
        except (ConfigError, ValueError) as err:
            raise ConfigError(f"--methods {spec}: {err}") from None
    load_examples(job.test)  # an unreadable --test file, before any training
    job.out.mkdir(parents=True, exist_ok=True)
    if job.threads:  # every train / eval process inherits it (train/fastpath.set_threads)
        os.environ["OMP_NUM_THREADS"] = str(job.threads)
    model_name = base.get("model", {}).get("name", "smollm2-135m-instruct")
    val = validation_file(base, job.out)
    base_eval = {
        "loss": evaluate(model_name, str(val), job.out / "base_loss.json", "loss", None)["loss"],
        "accuracy": evaluate(
            model_name, job.test, job.out / "base_accuracy.json", "accuracy", job.limit
        )["accuracy"],
    }
    rows, failed = [], []
    for i, spec in enumerate(specs):
        _write(job, base, base_eval, rows, failed, pending=specs[i:])  # honest while running
        print(f"== {spec}", flush=True)
        try:
            rows.append(compare_one(base, spec, job.out, job.test, job.steps, job.limit))
        except RuntimeError as err:
            failed.append(f"{spec}: {err}")
            print(f"   failed: {err}", flush=True)
        results = {"base": base_eval, "rows": rows}
        (job.out / "results.json").write_text(json.dumps(results, indent=1))
    _write(job, base, base_eval, rows, failed, pending=[])
    return 1 if failed else 0


def _write(job: CompareJob, base, base_eval, rows, failed, pending) -> None:
    t = base.get("train", {})
    steps = job.steps or t.get("max_steps")
    meta = (
        f"Measured {dt.date.today().isoformat()} on {machine()}. Same task and budget for every "
        f"row: `{job.config}`, {steps} steps × batch {t.get('batch_size', 8)}, max_length "
        f"{base.get('data', {}).get('max_length', 512)}, "
        f"{os.environ.get('OMP_NUM_THREADS', 'all')} torch thread(s) per process. Eval loss: mean token loss of the "
        f"answers on the held-out validation split (`{job.out}/validation.jsonl`); accuracy: "
        f"`{job.test}`{f' (first {job.limit} rows)' if job.limit else ''}.\n\n"
    )
    notes = "".join(f"- failed: {f}\n" for f in failed)
    if pending:
        notes += f"- not measured yet (the comparison is still running): {', '.join(pending)}\n"
    write_doc(job.doc, meta + markdown_table(base_eval, rows) + ("\n" + notes if notes else ""))
