"""report.html for a run directory: curves, final metrics, warnings and sample generations.

Rendered only from files the run left (metrics.jsonl, summary.json, config.yaml, samples.jsonl),
so `tuneforge report RUN_DIR` can redo it; the PNGs are embedded, the page needs no network.
Drawing the charts is plots.py's job.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from tuneforge.errors import RunDirError
from tuneforge.paths import write_text_atomic
from tuneforge.reporting.plots import make_plots
from tuneforge.reporting.tables import fmt_number
from tuneforge.train.rundir import SAMPLES_FILE

log = logging.getLogger("tuneforge")
PROMPT_CHARS = 300  # the tail of long prompts (system prompt, instructions) is what differs

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1000px;color:#222;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}table{border-collapse:collapse;margin:.5rem 0;font-size:.92rem}
td,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff4e5;border-left:4px solid #ff7f0e;padding:.5rem .8rem;margin:.4rem 0}
img{max-width:100%;display:block;margin:.6rem 0}
pre{background:#f7f7f7;padding:.6rem;overflow:auto;font-size:.85rem}
.samples td{max-width:320px;white-space:pre-wrap;word-break:break-word}
.ok{color:#2a7a2a}.bad{color:#b22}
"""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a run's .jsonl file; a torn last line (a crash mid-write) is skipped."""
    if not path.is_file():
        return []
    lines = _read_text(path).splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            if number == len(lines):
                continue
            raise RunDirError(f"{path}:{number}: not valid JSON; the file is damaged") from None
        if record is not None and not isinstance(record, dict):
            raise RunDirError(f"{path}:{number}: expected a JSON object per line")
        if record is not None:
            records.append(record)
    return records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RunDirError(f"{path}: not a UTF-8 text file (byte {err.start}); damaged?") from None


def _read_mapping(path: Path, parse: Any) -> dict[str, Any]:
    """summary.json / config.yaml as a mapping ({} when absent), RunDirError when damaged."""
    if not path.is_file():
        return {}
    try:
        value = parse(_read_text(path))
    except (ValueError, yaml.YAMLError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise RunDirError(f"{path}: damaged ({first})") from None
    if not isinstance(value, dict):
        raise RunDirError(f"{path}: expected a mapping, got {type(value).__name__}")
    return value


def load_run_files(run_dir: Path) -> dict[str, Any]:
    """metrics records, summary, config and samples of a run; RunDirError when it has no metrics."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise RunDirError(f"{run_dir}: no metrics.jsonl; is this a tuneforge run directory?")
    return {
        "records": read_jsonl(metrics),
        "summary": _read_mapping(run_dir / "summary.json", json.loads),
        "config": _read_mapping(run_dir / "config.yaml", yaml.safe_load),
        "samples": read_jsonl(run_dir / SAMPLES_FILE),
    }


def write_report(run_dir: str | Path) -> Path:
    """Draw plots/*.png and write report.html into `run_dir`; returns the report's path."""
    run_dir = Path(run_dir)
    files = load_run_files(run_dir)
    best = files["summary"].get("best") or {}
    pngs = make_plots(files["records"], run_dir / "plots", best.get("step"))
    page = render_html(run_dir.name, files, pngs)
    write_text_atomic(run_dir / "report.html", page)
    return run_dir / "report.html"


def write_report_or_warn(run_dir: str | Path) -> Path | None:
    """write_report at the end of training: a failure there is reported, the run is kept."""
    try:
        return write_report(run_dir)
    except Exception as err:  # the trained model is saved already; do not fail the run over a chart
        log.warning("report: could not write %s/report.html (%s); retry: tuneforge report %s",
                    run_dir, err, run_dir)  # fmt: skip
        return None


def render_html(title: str, files: dict[str, Any], pngs: list[Path]) -> str:
    """The whole page as one string: CSS inline, each PNG as a base64 data URI."""
    summary, config, records = files["summary"], files["config"], files["records"]
    esc = html.escape
    model = (config.get("model") or {}).get("name", "?")
    method = (config.get("method") or {}).get("name", "?")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>tuneforge report: {esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Run report: {esc(title)}</h1>",
        f"<p class='sub'>model {esc(str(model))} · method {esc(str(method))} · "
        f"{_steps_text(summary)}</p>",
        _warnings_html(records),
        "<h2>Final metrics</h2>",
        _metrics_table(summary),
        "<h2>Curves</h2>",
        *(_img(png) for png in pngs),
        _samples_html(files["samples"]),
        _signatures_html(summary),
        "<h2>Configuration</h2><details><summary>resolved config.yaml</summary><pre>",
        esc(yaml.safe_dump(config, sort_keys=False, allow_unicode=True)),
        "</pre></details></body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _steps_text(summary: dict[str, Any]) -> str:
    if not summary:
        return "unfinished run (no summary.json)"
    text = f"{summary.get('steps', '?')} of {summary.get('total_steps', '?')} steps"
    return text + (" · stopped early" if summary.get("stopped_early") else "")


def _metrics_table(summary: dict[str, Any]) -> str:
    rows = [(k.removeprefix("eval_"), v) for k, v in (summary.get("eval") or {}).items()]
    rows = [(f"validation {k}", v) for k, v in rows if isinstance(v, int | float)]
    for key in ("train_loss", "final_train_loss", "train_runtime_s", "tokens_per_s",
                "peak_memory_mb", "trainable_params"):  # fmt: skip
        if key in summary:
            rows.append((key, summary[key]))
    best = summary.get("best")
    if best:
        rows.append(
            (
                "best (restored)",
                f"{best['metric']} {fmt_number(best['value'])} at step {best['step']}",
            )
        )
    if not rows:
        return "<p>No final metrics (the run has no summary.json).</p>"
    body = "".join(
        f"<tr><td>{html.escape(k)}</td><td class='num'>{html.escape(fmt_number(v))}</td></tr>"
        for k, v in rows
    )
    return f"<table><tr><th>metric</th><th>value</th></tr>{body}</table>"


def _warnings_html(records: list[dict[str, Any]]) -> str:
    warnings = [r for r in records if r.get("warning")]
    return "".join(
        f"<div class='warn'>⚠ step {r.get('step')}: {html.escape(str(r['warning']))}</div>"
        for r in warnings
    )


def _img(png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(png.stem)}' src='data:image/png;base64,{data}'>"


def _samples_html(samples: list[dict[str, Any]]) -> str:
    """The last evaluation's generations beside their references (and the first's, if earlier)."""
    if not samples:
        return ""
    steps = sorted({s["step"] for s in samples})
    first = {s["source"]: s["prediction"] for s in samples if s["step"] == steps[0]}
    last = [s for s in samples if s["step"] == steps[-1]]
    earlier = len(steps) > 1
    head = "<tr><th>prompt (end)</th>"
    head += f"<th>step {steps[0]}</th>" if earlier else ""
    head += f"<th>generated (step {steps[-1]})</th><th>reference</th></tr>"
    rows = []
    for s in last:
        prompt = (
            s["prompt"] if len(s["prompt"]) <= PROMPT_CHARS else "…" + s["prompt"][-PROMPT_CHARS:]
        )
        same = s["prediction"].strip() == s["reference"].strip()
        cells = [html.escape(prompt)]
        if earlier:
            cells.append(html.escape(first.get(s["source"], "")))
        cells.append(
            f"<span class='{'ok' if same else 'bad'}'>{html.escape(s['prediction'])}</span>"
        )
        cells.append(html.escape(s["reference"]))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (
        "<h2>Sample generations</h2><p class='sub'>greedy; green: equal to the reference</p>"
        f"<table class='samples'>{head}{''.join(rows)}</table>"
    )


def _signatures_html(summary: dict[str, Any]) -> str:
    signatures = (summary.get("eval") or {}).get("eval_signatures") or {}
    if not signatures:
        return ""
    items = "".join(
        f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>"
        for k, v in signatures.items()
    )
    lang = (summary.get("eval") or {}).get("eval_lang", "?")
    return f"<h2>Metric signatures</h2><p>references detected as <b>{html.escape(str(lang))}</b></p><ul>{items}</ul>"
