"""The broken-input table (issue 19): rows per command group, and the machinery that runs them.

Each `tests/bad_inputs/<group>.py` holds `ROWS = [{...}, ...]` (format: README.md here); this
package finds them, prepares each row's files and runs the CLI. Judging the result is
tests/test_bad_inputs.py's job; nothing here knows what a command should say.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDERS = ("{tmp}", "{model}", "{model_wide}", "{run}")
ROW_KEYS = {"id", "argv", "files", "exit", "stderr", "setup", "leaves", "timeout"}
ID_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
CLI = "tuneforge.cli"

# --- plain-data pieces the row files share ---------------------------------------------------

#: A small valid `messages` training file: a row breaks one thing and keeps the rest valid.
TOY_JSONL = "".join(
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"Color of {thing}?"},
                {"role": "assistant", "content": color},
            ]
        }
    )
    + "\n"
    for thing, color in [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("rose", "red")]
    * 4
)
#: Two-label classification rows for eval (accuracy needs two distinct labels).
TOY_LABELS = "".join(
    json.dumps({"text": text, "label": label}) + "\n"
    for text, label in [("great book", "positive"), ("bad book", "negative")] * 2
)


#: A Parquet file whose columns have the wrong types (instruction/output as numbers).
def _parquet_wrong_types() -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"instruction": [1, 2], "output": [3.5, 4.5]}), buffer)
    return buffer.getvalue()


PARQUET_WRONG_TYPES = _parquet_wrong_types()
#: 3 kB of bytes that are not UTF-8 in any line (a binary file under a data-file name).
BINARY = bytes(range(128, 256)) * 24
#: Valid GGUF magic and version, then the header stops (counts and key/values missing).
GGUF_TRUNCATED = b"GGUF\x03\x00\x00\x00\x02\x00\x00\x00"
GGUF_WRONG_MAGIC = b"GGML" + bytes(60)

_COPY = ("copy", "{model}", "m")
#: Broken models, each at {tmp}/m (or {tmp}/m.gguf): (name, model path, files, setup, the
#: substring every command's error must contain). Rows for train, cv, data check, eval and
#: generate are made from this one list.
BROKEN_MODELS = [
    ("dir-without-tokenizer", "{tmp}/m", {}, [_COPY, ("remove", "m/tokenizer.json")],
     "no tokenizer"),
    ("dir-without-weights", "{tmp}/m", {}, [_COPY, ("remove", "m/model.safetensors")],
     "has no .safetensors weights"),
    ("dir-without-config", "{tmp}/m", {}, [_COPY, ("remove", "m/config.json")],
     "neither a built-in model"),
    ("dir-with-config-only", "{tmp}/m", {}, [("mkdir", "m"), ("copy", "{model}/config.json", "m/config.json")],
     "has no .safetensors weights"),
    ("config-not-json", "{tmp}/m", {}, [_COPY, ("overwrite", "m/config.json", 0, b"\x00{{")],
     "config.json: not valid JSON"),
    ("unknown-architecture", "{tmp}/m", {}, [_COPY, ("patch_json", "m/config.json", {"model_type": "nonexistent_arch"})],
     "unknown architecture model_type 'nonexistent_arch'"),
    ("safetensors-truncated", "{tmp}/m", {}, [_COPY, ("truncate", "m/model.safetensors", 0.5)],
     "model.safetensors: damaged safetensors file (truncated"),
    ("safetensors-bad-header", "{tmp}/m", {}, [_COPY, ("overwrite", "m/model.safetensors", 8, b"{not json")],
     "model.safetensors: damaged safetensors file (bad header"),
    ("gguf-truncated", "{tmp}/m.gguf", {"m.gguf": GGUF_TRUNCATED}, [],
     "m.gguf: truncated or damaged GGUF file"),
    ("gguf-wrong-magic", "{tmp}/m.gguf", {"m.gguf": GGUF_WRONG_MAGIC}, [],
     "m.gguf is not a GGUF file"),
    ("gguf-missing", "{tmp}/none.gguf", {}, [], "GGUF file {tmp}/none.gguf not found"),
    ("unknown-name", "no-such-model", {}, [], "'no-such-model' is neither a built-in model"),
]  # fmt: skip

#: Broken copies of {run} at {tmp}/r: (name, setup, substring), for eval and generate.
BROKEN_RUNS = [
    ("run-without-adapter", [("copy", "{run}", "r"), ("remove", "r/adapter")],
     "neither adapter/ nor model/ found"),
    ("run-corrupt-config-yaml", [("copy", "{run}", "r"), ("overwrite", "r/config.yaml", 0, b"model: [oops\n")],
     "r/config.yaml: damaged"),
    ("run-config-yaml-not-a-mapping", [("copy", "{run}", "r"), ("remove", "r/config.yaml"), ("write", "r/config.yaml", "- a\n- b\n")],
     "r/config.yaml: expected a mapping"),
    ("run-corrupt-manifest", [("copy", "{run}", "r"), ("overwrite", "r/manifest.json", 0, b"{not json")],
     "r/manifest.json: damaged"),
    ("run-adapter-truncated", [("copy", "{run}", "r"), ("truncate", "r/adapter/adapter_model.safetensors", 0.5)],
     "adapter_model.safetensors: damaged safetensors file (truncated"),
    ("run-adapter-pickled-only", [("copy", "{run}", "r"), ("remove", "r/adapter/adapter_model.safetensors"), ("write", "r/adapter/adapter_model.bin", "x")],
     "pickled adapters (.bin) are refused"),
    ("run-adapter-base-mismatch", [("copy", "{run}", "r"), ("patch_json", "r/manifest.json", {"base_model.dir": "{model_wide}"})],
     "r/adapter: does not fit the base model {model_wide}"),
    ("run-tokenizer-missing", [("copy", "{run}", "r"), ("remove", "r/tokenizer")],
     "r/tokenizer: not a directory"),
]  # fmt: skip


def run_config(
    train: str = "{tmp}/train.jsonl", out: str = "{tmp}/out", model: str = "{model}", **extra: Any
) -> str:
    """A tiny valid run config as YAML text; `extra` replaces whole sections (e.g. data={...})."""
    cfg: dict[str, Any] = {
        "model": {"name": model, "dtype": "fp32"},
        "method": {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0},
        "data": {"train": train, "validation": None, "max_length": 48},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "scheduler": "constant"},
        "eval": {"every_steps": None},
        "checkpoint": {"every_steps": None},
        "log": {"report": False},
        "output": {"dir": out},
    }
    cfg.update(extra)
    return json.dumps(cfg, indent=1) + "\n"  # JSON is YAML, and keeps {placeholders} intact


# --- finding rows ----------------------------------------------------------------------------


def load_rows() -> list[tuple[str, dict[str, Any]]]:
    """(group, row) for every row of every `bad_inputs/<group>.py`, in file order."""
    rows = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for row in getattr(module, "ROWS", []):
            rows.append((info.name, row))
    return rows


def leaf_commands(parser: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every runnable command path of an argparse parser: ("train",), ("data", "check"), ..."""
    import argparse

    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += leaf_commands(sub, (*prefix, name)) or [(*prefix, name)]
    return found


# --- preparing a row -------------------------------------------------------------------------


def expand(value: Any, places: dict[str, str]) -> Any:
    """Replace {tmp}, {model}, {model_wide}, {run} in strings (other braces stay as they are)."""
    if isinstance(value, str):
        for key, path in places.items():
            value = value.replace(key, path)
        return value
    if isinstance(value, list | tuple):
        return type(value)(expand(v, places) for v in value)
    if isinstance(value, dict):
        return {k: expand(v, places) for k, v in value.items()}
    return value


def prepare(row: dict[str, Any], places: dict[str, str]) -> None:
    """Write the row's `files` under {tmp}, then apply its `setup` operations in order."""
    tmp = Path(places["{tmp}"])
    for rel, content in row.get("files", {}).items():
        path = tmp / expand(rel, places)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(expand(content, places), encoding="utf-8")
    for op, *args in row.get("setup", []):
        _SETUP[op](tmp, *expand(list(args), places))


def _copy(tmp: Path, src: str, dest: str) -> None:
    source, target = Path(src), tmp / dest
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def _remove(tmp: Path, rel: str) -> None:
    path = tmp / rel
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _truncate(tmp: Path, rel: str, keep: float) -> None:
    """Keep the first `keep` bytes (an int) or that fraction of the file (a float < 1)."""
    path = tmp / rel
    size = path.stat().st_size
    os.truncate(path, int(size * keep) if isinstance(keep, float) else keep)


def _overwrite(tmp: Path, rel: str, offset: int, data: bytes) -> None:
    with (tmp / rel).open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _patch_json(tmp: Path, rel: str, changes: dict[str, Any]) -> None:
    """Set dotted keys of a JSON file (e.g. {"base_model.dir": "/x"})."""
    path = tmp / rel
    data = json.loads(path.read_text(encoding="utf-8"))
    for dotted, value in changes.items():
        node = data
        keys = dotted.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    path.write_text(json.dumps(data), encoding="utf-8")


def _mkdir(tmp: Path, rel: str) -> None:
    (tmp / rel).mkdir(parents=True, exist_ok=True)


def _write(tmp: Path, rel: str, content: str | bytes) -> None:
    path = tmp / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)


_SETUP = {
    "copy": _copy,
    "remove": _remove,
    "truncate": _truncate,
    "overwrite": _overwrite,
    "patch_json": _patch_json,
    "mkdir": _mkdir,
    "write": _write,
}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under `root` (symlinks not followed)."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file() or path.is_symlink():
            stat = path.lstat()
            out[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return out


# --- running the CLI -------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    """The environment every run gets: this worktree's sources first, one thread, offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p
    )
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.setdefault("COLUMNS", "100")
    return env


def run_subprocess(
    argv: list[str], cwd: Path, timeout: int = 180, *, module: str = CLI, path: Sequence[str] = ()
) -> tuple[int, str, str]:
    """`python -m MODULE ARGV` in a fresh interpreter: (exit code, stdout, stderr); `path` goes
    first on PYTHONPATH."""
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([*path, env["PYTHONPATH"]])
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stdout, proc.stderr


class ForkRunner:
    """A warm interpreter (bad_inputs/_worker.py) that forks one child per CLI run."""

    def __init__(self) -> None:
        worker = Path(__file__).with_name("_worker.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(worker)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=cli_env(),
            text=True,
        )
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError("the bad-input worker did not start")

    def run(
        self,
        argv: list[str],
        cwd: Path,
        timeout: int = 120,
        *,
        module: str = CLI,
        path: Sequence[str] = (),
    ) -> tuple[int, str, str]:
        """Like run_subprocess, in a forked child: (exit code, stdout, stderr)."""
        out, err = cwd.parent / f".{cwd.name}.stdout", cwd.parent / f".{cwd.name}.stderr"
        request = {"argv": argv, "cwd": str(cwd), "out": str(out), "err": str(err)}
        request |= {"timeout": timeout, "module": module, "path": list(path)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        code = json.loads(self.proc.stdout.readline())["code"]
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in (out, err)]
        out.unlink()
        err.unlink()
        return code, texts[0], texts[1]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# --- the shared fixtures: {model}, {model_wide}, {run} ---------------------------------------


def build_models(root: Path) -> dict[str, str]:
    """{model}: the tiny random Llama + tokenizer (conftest); {model_wide}: the same with hidden
    size 48, a base that no adapter of {model} fits."""
    from conftest import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    places = {}
    for key, overrides in (("{model}", {}), ("{model_wide}", {"hidden_size": 48})):
        path = root / key.strip("{}")
        model = build_tiny_llama(len(tokenizer), **overrides)
        model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        places[key] = str(path)
    return places


def build_run(root: Path, places: dict[str, str], runner: ForkRunner) -> str:
    """{run}: a finished 2-step LoRA run of {model}, trained through the CLI."""
    work = root / "run-work"
    work.mkdir()
    (work / "train.jsonl").write_text(TOY_JSONL, encoding="utf-8")
    config = expand(run_config(out=str(root / "run")), {**places, "{tmp}": str(work)})
    (work / "run.yaml").write_text(config, encoding="utf-8")
    code, out, err = runner.run(["train", "run.yaml", "--quiet"], work, timeout=300)
    if code != 0:
        raise RuntimeError(f"building {{run}} failed ({code}):\n{out}\n{err}")
    return str(root / "run")
