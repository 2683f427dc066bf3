"""`tuneforge export` end to end on a hand-built tiny run: files, the re-check's numbers (the same
as `tuneforge eval` on the reference), --max-regression, atomic writes and --overwrite."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from exporthelpers import make_run
from tuneforge.cli import main
from tuneforge.data.formats import load_examples
from tuneforge.errors import ExportError
from tuneforge.evaluation.runner import evaluate_examples
from tuneforge.loading import load_run
from tuneforge.recipes.export import ExportJob, export_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_tokenizer):
    return make_run(tmp_path_factory.mktemp("export-run"), tiny_tokenizer)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    rows = [
        {"text": f"{thing} is nice", "label": "positive" if i % 2 else "negative"}
        for i, thing in enumerate(["book", "fox", "snow", "rose", "sky", "apple"])
    ]
    path = tmp_path_factory.mktemp("cls") / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gguf_export_writes_files_and_a_recheck_that_agrees_with_eval(
    run, labelled, tmp_path, one_thread
):
    out = tmp_path / "gguf"
    job = ExportJob(run, "gguf", ["q8_0", "f16"], out=out, data=str(labelled), threads=1)
    outcome = export_run(job)
    stem = run.name
    assert outcome.out_dir == out and outcome.passed
    assert set(outcome.files) == {
        f"{stem}-q8_0.gguf",
        f"{stem}-f16.gguf",
        f"{stem}-lora-adapter.gguf",
        "Modelfile",
        "export.json",
        "export.txt",
    }
    assert (out / "Modelfile").read_text().startswith(f"FROM ./{stem}-q8_0.gguf\n")
    report = json.loads((out / "export.json").read_text())
    ref, q8, f16 = report["artefacts"]
    assert [e["status"] for e in report["artefacts"]] == ["reference", "ok", "ok"]
    assert q8["path"] == f"{stem}-q8_0.gguf" and q8["tokenizer_agreement"] == 1.0
    loaded = load_run(run, torch.float32)  # what `tuneforge eval` computes on the same rows
    examples = load_examples(str(labelled), "auto", on_bad_row="fail").examples
    expected = evaluate_examples(
        loaded.model, loaded.tokenizer, examples, ["loss", "accuracy"], batch_size=2
    )
    for key in ("loss", "accuracy", "macro_f1"):
        assert ref["metrics"][key] == pytest.approx(expected[key], abs=1e-4), key
    assert abs(f16["deltas"]["loss"]) < 1e-3 and f16["greedy_agreement"] == 32
    assert 0 < f16["size_mb"] and q8["size_mb"] < f16["size_mb"]
    assert ref["peak_rss_mb"] > q8["peak_rss_mb"] > 0  # torch + model vs llama.cpp alone


def test_max_regression_fails_but_keeps_the_artefact(run, tmp_path, one_thread, capsys):
    out = tmp_path / "strict"
    argv = ["export", str(run), "--format", "gguf", "--quant", "q4_0", "--out", str(out)]
    code = main([*argv, "--threads", "1", "--limit", "4", "--max-regression", "loss=0"])
    assert code == 1
    report = json.loads((out / "export.json").read_text())
    assert report["passed"] is False
    failed = report["artefacts"][1]
    assert failed["status"] == "failed" and "loss regressed by" in failed["failures"][0]
    assert (out / f"{run.name}-q4_0.gguf").is_file()
    assert "re-check failed" in capsys.readouterr().out


def test_interrupted_export_leaves_no_final_name(run, tmp_path, monkeypatch):
    import tuneforge.recipes.export as recipe

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "quantize_gguf", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_run(ExportJob(run, "gguf", ["q8_0"], out=out, recheck=False))
    assert list(tmp_path.iterdir()) == []  # no final name, no partial or scratch left behind


def test_existing_out_is_refused_unless_overwrite(run, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ExportError, match="already exists"):
        export_run(ExportJob(run, "merged", out=out, recheck=False))
    assert (out / "old.txt").is_file()
    export_run(ExportJob(run, "merged", out=out, recheck=False, overwrite=True))
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_generation_data_recheck_scores_greedy_answers_like_transformers(
    run, labelled, tmp_path, one_thread, monkeypatch
):
    """On chat data without labels, every artefact answers the held-out prompts greedily and is
    scored with BLEU/chrF/ROUGE. The references here are transformers' own greedy answers of the
    run, so the reference row must score exactly what score_texts gives identical texts (chrF 100):
    a prompt, stop id, length or decoding that differs from `generate` breaks it."""
    import tuneforge.export.evalset as evalset_module
    from tuneforge.data.templates import render_prompt
    from tuneforge.evaluation.score import META_KEY, score_texts
    from tuneforge.export.chatformat import stop_ids

    monkeypatch.setattr(evalset_module, "GEN_MAX_TOKENS", 10)
    loaded = load_run(run, torch.float32)
    tok, rows = loaded.tokenizer, []
    for thing in ["fox", "snow", "rose", "sky", "apple", "book"]:
        messages = [{"role": "user", "content": f"Color of {thing}?"}]
        prompt = torch.tensor([render_prompt(tok, messages)])
        out = loaded.model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=stop_ids(tok),
            pad_token_id=tok.pad_token_id,
        )
        answer = tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip()
        if answer:
            rows.append({"messages": [*messages, {"role": "assistant", "content": answer}]})
    assert len(rows) >= 3
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gguf"
    export_run(ExportJob(run, "gguf", ["f16"], out=out, data=str(data), threads=1))
    ref, f16 = json.loads((out / "export.json").read_text())["artefacts"]
    answers = [r["messages"][-1]["content"] for r in rows]
    expected = score_texts(answers, answers, ["bleu", "chrf", "rouge"])
    expected.pop(META_KEY)
    assert expected["chrf"] == pytest.approx(100.0)
    for name, value in expected.items():
        assert ref["metrics"][name] == pytest.approx(value, abs=1e-9), name
    assert set(expected) <= set(f16["deltas"])  # llama.cpp's answers scored the same way
    with pytest.raises(ExportError, match="bleu is not measured"):  # labels, no generations
        job = ExportJob(run, "gguf", ["f16"], out=tmp_path / "x", data=str(labelled), threads=1)
        export_run(replace(job, max_regression={"bleu": 1.0}))
    assert not (tmp_path / "x").exists()
