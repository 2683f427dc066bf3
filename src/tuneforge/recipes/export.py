"""The export recipe: read a finished run, write the asked artefact(s) atomically, re-check them.

Every check that can fail on the user's input runs before anything is written; the pieces
(merge, GGUF writing and quantising, NF4, the re-check) live in `tuneforge.export`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tuneforge.config import RunConfig, build_config
from tuneforge.constants import LABEL_METRICS
from tuneforge.data.formats import load_examples
from tuneforge.data.pipeline import split_examples
from tuneforge.errors import ExportError
from tuneforge.export.chatformat import stop_ids, turn_format
from tuneforge.export.evalset import EvalSet, build_eval_set, is_classification
from tuneforge.export.gguf_arch import architecture
from tuneforge.export.gguf_vocab import read_vocab
from tuneforge.export.gguf_write import FLOAT_TYPES, read_config, write_gguf
from tuneforge.export.lora_gguf import write_lora_gguf
from tuneforge.export.merge import check_adapter_files, merge_adapter, save_hf_dir, weights_bytes
from tuneforge.export.modelfile import render_modelfile
from tuneforge.export.nf4 import bitsandbytes_ready, write_nf4
from tuneforge.export.quantize import DEFAULT_QUANT, llama_cpp_module, quantize_gguf
from tuneforge.export.recheck import Artefact, check_measurable, recheck, report_table
from tuneforge.loading import run_method
from tuneforge.models import load_model, load_tokenizer, resolve_dtype, resolve_model_dir
from tuneforge.paths import write_json_atomic, write_text_atomic
from tuneforge.train.rundir import read_run

log = logging.getLogger("tuneforge")
FORMATS = ("merged", "gguf", "nf4")


@dataclass
class ExportJob:
    run_dir: Path
    fmt: str
    quants: list[str] = field(default_factory=lambda: [DEFAULT_QUANT])
    out: Path | None = None  # default: RUN_DIR/export-FORMAT
    data: str | None = None  # held-out file; default: the run's validation split
    max_regression: dict[str, float] = field(default_factory=dict)
    overwrite: bool = False
    limit: int | None = 200  # held-out examples re-checked
    threads: int | None = None
    recheck: bool = True


@dataclass
class ExportOutcome:
    out_dir: Path
    report: dict[str, Any] | None
    files: list[str]

    @property
    def passed(self) -> bool:
        return self.report is None or bool(self.report["passed"])


@dataclass
class _Run:
    """What the export reads from the run directory, once."""

    path: Path
    cfg: RunConfig
    method_name: str
    artifact: str  # "adapter" or "model"
    base_dir: Path
    weights_dir: Path  # run/model for full runs, the base for adapter runs
    tokenizer: Any

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"


def _read_run(run_dir: Path) -> _Run:
    """The run's config, method and artefact, checked; the tokenizer is loaded by `_check_job`."""
    config, manifest = read_run(run_dir)
    method = run_method(config)
    cfg = build_config(config)
    if (run_dir / "model" / "config.json").is_file():
        artifact = "model"
    elif (run_dir / "adapter" / "adapter_config.json").is_file():
        artifact = "adapter"
    else:
        raise ExportError(f"{run_dir}: neither adapter/ nor model/ found; did the run finish?")
    if artifact == "adapter" and not method.mergeable:
        raise ExportError(
            f"method {method.name}: its adapter adds virtual tokens and cannot be folded into the "
            "weights, so it cannot be exported; serve the run directory as it is, or retrain with "
            "method lora, ia3 or full"
        )
    if artifact == "adapter":
        check_adapter_files(run_dir / "adapter")
    if not (run_dir / "tokenizer" / "tokenizer_config.json").is_file():
        raise ExportError(f"{run_dir}/tokenizer: missing; the run directory is incomplete")
    if artifact == "model":  # a full run holds every weight itself
        return _Run(run_dir, cfg, method.name, artifact, run_dir / "model", run_dir / "model", None)
    base_dir = Path(manifest["base_model"]["dir"])
    if not (base_dir / "config.json").is_file():  # the cache moved: resolve the name again
        base_dir = resolve_model_dir(manifest["base_model"]["name"])
    return _Run(run_dir, cfg, method.name, artifact, base_dir, base_dir, None)


def _check_job(job: ExportJob, run: _Run) -> None:
    """Fail on anything the chosen format cannot do, before writing; loads the tokenizer."""
    if job.fmt not in FORMATS:
        raise ExportError(f"--format: {job.fmt!r} is not one of {', '.join(FORMATS)}")
    if job.fmt != "gguf" and job.quants != [DEFAULT_QUANT]:
        raise ExportError(f"--quant applies to --format gguf only, not {job.fmt}")
    cfg = read_config(run.weights_dir)
    if job.fmt == "gguf":
        architecture(cfg)
        if any(q not in FLOAT_TYPES for q in job.quants) or job.recheck:
            llama_cpp_module()
    if job.fmt == "nf4":
        bitsandbytes_ready()
    run.tokenizer = load_tokenizer(run.path / "tokenizer", run.cfg.model.trust_remote_code)
    if job.fmt == "gguf":
        read_vocab(run.tokenizer, run.path / "tokenizer", int(cfg["vocab_size"]))


def _held_out(job: ExportJob, cfg: RunConfig) -> tuple[list, str]:
    d = cfg.data
    if job.data:
        return load_examples(job.data, "auto", on_bad_row="fail").examples, job.data
    if isinstance(d.validation, str):
        return load_examples(d.validation, d.format, d.on_bad_row).examples, d.validation
    if d.validation is None:
        raise ExportError(
            "the run has no held-out data (data.validation: null); pass --data FILE to re-check"
        )
    train = load_examples(d.train, d.format, d.on_bad_row).examples
    held = split_examples(train, float(d.validation), cfg.train.seed)[1]
    return held, f"{d.train} (the run's {d.validation:g} validation split)"


def _eval_set(job: ExportJob, run: _Run) -> EvalSet:
    examples, source = _held_out(job, run.cfg)
    examples = examples[: job.limit] if job.limit else examples
    asked = any(m in LABEL_METRICS for m in run.cfg.eval.metrics)
    return build_eval_set(
        run.tokenizer,
        examples,
        classification=is_classification(examples, asked),
        max_length=run.cfg.data.max_length,
        source=source,
    )


def _out_dir(job: ExportJob) -> Path:
    out = Path(job.out) if job.out else job.run_dir / f"export-{job.fmt}"
    if out.exists() and not job.overwrite:
        raise ExportError(f"--out: {out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out: {out} is a file, not a directory")
    return out


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A hidden directory beside `out` that becomes `out` only when the block completes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # not mkdtemp: the final directory gets the usual permissions
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_merged(run: _Run, dest: Path) -> Path:
    """The run as one plain HF directory (the adapter folded in, or the full model as is)."""
    dtype = resolve_dtype(run.cfg.model.dtype)
    trust = run.cfg.model.trust_remote_code
    if run.artifact == "model":
        model = load_model(run.path / "model", dtype, trust_remote_code=trust)
    else:
        log.info("merging the %s adapter into %s", run.method_name, run.base_dir)
        model = merge_adapter(run.base_dir, run.adapter_dir, dtype, trust)
    save_hf_dir(model, run.tokenizer, dest, stop_ids(run.tokenizer))
    return dest


def _stem(run: _Run) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", run.path.resolve().name).strip(".-") or "model"


def _write_modelfile(run: _Run, dest: Path, gguf_name: str, merged: Path, notes: dict) -> None:
    """An Ollama Modelfile beside the GGUF: the run's turn format, stop tokens, sampling."""
    tok = run.tokenizer
    try:
        fmt = turn_format(tok)
    except ExportError as err:
        fmt, notes["modelfile"] = None, f"no TEMPLATE ({err}); Ollama uses the GGUF's template"
    stops = [tok.convert_ids_to_tokens(i) for i in stop_ids(tok)]
    adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    text = render_modelfile(
        gguf_name,
        fmt,
        stops,
        generation=json.loads((merged / "generation_config.json").read_text(encoding="utf-8")),
        num_ctx=min(_context_length(read_config(merged)), 8192),
        drop_start=bool(fmt and adds_bos and fmt.start == tok.bos_token),
    )
    write_text_atomic(dest / "Modelfile", text)


def _context_length(cfg: dict[str, Any]) -> int:
    return int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048)


def _write_gguf_set(job: ExportJob, run: _Run, dest: Path, scratch: Path, bar) -> list[Artefact]:
    merged = _write_merged(run, scratch / "merged")
    bar.update(1)
    stem, tok_dir, notes = _stem(run), run.path / "tokenizer", {}
    source = write_gguf(merged, run.tokenizer, tok_dir, scratch / "f32.gguf", "f32", stem)
    artefacts = []
    for quant in job.quants:
        path = dest / f"{stem}-{quant}.gguf"
        if quant in FLOAT_TYPES:
            write_gguf(merged, run.tokenizer, tok_dir, path, quant, stem)
        else:
            quantize_gguf(source, path, quant, job.threads)
        artefacts.append(Artefact(f"gguf-{quant}", "gguf", path, weights_bytes(path)))
        bar.update(1)
    if run.artifact == "adapter":
        try:
            write_lora_gguf(run.adapter_dir, run.base_dir, dest / f"{stem}-lora-adapter.gguf")
        except ExportError as err:
            notes["lora_adapter"] = f"not written: {err}"
    _write_modelfile(run, dest, artefacts[0].path.name, merged, notes)
    if notes:
        write_json_atomic(dest / "notes.json", notes)
    return artefacts


def _write_artefacts(job: ExportJob, run: _Run, dest: Path) -> list[Artefact]:
    steps = {"merged": 1, "nf4": 2, "gguf": 1 + len(job.quants)}[job.fmt]
    with (
        tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.scratch-") as scratch,
        tqdm(total=steps, desc=f"export {job.fmt}", unit="step") as bar,
    ):
        if job.fmt == "merged":
            _write_merged(run, dest)
            bar.update(1)
            return [Artefact("merged", "hf", dest, weights_bytes(dest))]
        if job.fmt == "nf4":
            merged = _write_merged(run, Path(scratch) / "merged")
            bar.update(1)
            write_nf4(merged, run.tokenizer, dest, resolve_dtype(run.cfg.model.dtype))
            bar.update(1)
            return [Artefact("nf4", "nf4", dest, weights_bytes(dest))]
        return _write_gguf_set(job, run, dest, Path(scratch), bar)


def _reference(run: _Run) -> Artefact:
    size = weights_bytes(run.path / "model") if run.artifact == "model" else 0
    if run.artifact == "adapter":
        size = sum(f.stat().st_size for f in run.base_dir.glob("*.safetensors"))
        size += weights_bytes(run.adapter_dir)
    return Artefact(f"run ({run.method_name}, unmerged)", "run", run.path, size)


def export_run(job: ExportJob) -> ExportOutcome:
    """Write the export of `job.run_dir` to its out dir, re-checked; nothing written on bad input."""
    run = _read_run(Path(job.run_dir))
    _check_job(job, run)
    evalset = _eval_set(job, run) if job.recheck else None
    if evalset is not None:
        check_measurable(job.max_regression, evalset)  # before anything is written
    out = _out_dir(job)
    with staged(out) as tmp:
        artefacts = _write_artefacts(job, run, tmp)
        report = None
        if evalset is not None:
            report = recheck(
                _reference(run),
                artefacts,
                evalset,
                dtype=run.cfg.model.dtype,
                threads=job.threads,
                max_regression=job.max_regression,
                decode=partial(run.tokenizer.decode, skip_special_tokens=True),
            )
            for entry in report["artefacts"][1:]:
                entry["path"] = os.path.relpath(entry["path"], tmp)
            write_json_atomic(tmp / "export.json", {"format": job.fmt, **report})
            write_text_atomic(tmp / "export.txt", report_table(report) + "\n")
        files = sorted(p.name for p in tmp.iterdir())
    return ExportOutcome(out, report, files)
