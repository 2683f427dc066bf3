"""A tiny run with generation eval and TensorBoard on: samples and scores, report.html and plots,
`tuneforge report`, TensorBoard scalars, and the message when tensorboard is missing."""

from __future__ import annotations

import base64
import json
import re
import sys

import pytest

from tuneforge.cli import main
from tuneforge.evaluation.score import score_texts
from tuneforge.loading import generate, load_reference

from helpers import write_run_config, write_toy_messages

EVIL = "<script>alert(1)</script> Color of sky?"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("report-run")
    data = write_toy_messages(tmp / "train.jsonl", n=48)
    val = write_toy_messages(tmp / "val.jsonl", n=10, seed=5)
    lines = val.read_text().splitlines()
    first = json.loads(lines[0])
    first["messages"][0]["content"] = EVIL
    val.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    cfg = write_run_config(
        tmp / "run.yaml",
        tiny_model_dir,
        data,
        tmp / "run",
        data={"validation": str(val)},
        train={"max_steps": 6, "lr": 1e-2},
        eval={
            "every_steps": 3,
            "generate": True,
            "max_new_tokens": 5,
            "num_samples": 100,
            "metrics": ["loss", "bleu", "chrf", "exact_match", "accuracy"],
        },
        log={"tensorboard": True},
    )
    assert main(["train", str(cfg), "--quiet"]) == 0
    return tmp / "run"


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_generation_scores_match_the_logged_samples(run):
    evals = [r for r in _records(run) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    final = [s for s in samples if s["step"] == 6]
    assert len(final) == 10  # every validation row, in file order
    assert final[0]["prompt"].count("<script>") == 1
    preds, refs = [s["prediction"] for s in final], [s["reference"] for s in final]
    expected = score_texts(preds, refs, ["bleu", "chrf", "exact_match"], lang="en")
    for key in ("bleu", "chrf", "exact_match"):
        assert evals[-1][f"eval_{key}"] == pytest.approx(expected[key])
    assert "tok:13a" in evals[-1]["eval_signatures"]["bleu"]
    assert 0.0 <= evals[-1]["eval_accuracy"] <= 100.0 and "eval_macro_f1" in evals[-1]


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(run):
    """The final evaluation ran on the weights that were saved: one-by-one greedy must agree."""
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    final = [s for s in samples if s["step"] == 6]
    loaded = load_reference(run, dtype="fp32")
    for s in final:
        question = s["prompt"].removeprefix("user\n").removesuffix("\nassistant\n")
        assert generate(loaded, question, max_new_tokens=5).strip() == s["prediction"]


def _embedded_pngs(page: str) -> list[bytes]:
    return [
        base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    ]


def test_report_is_self_contained_and_embeds_every_plot(run):
    page = (run / "report.html").read_text(encoding="utf-8")
    pngs = sorted((run / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["loss.png", "lr.png", "metrics.png"]
    assert sorted(_embedded_pngs(page)) == sorted(p.read_bytes() for p in pngs)
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width = int.from_bytes(data[16:20], "big")
        assert width >= 600
    # offline: no external scripts, styles or images; user text is escaped
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['eval']['eval_loss']:.4f}" in page
    assert "Sample generations" in page and "generated (step 6)" in page


def test_report_command_regenerates_the_report(run, capsys):
    before = (run / "report.html").read_text(encoding="utf-8")
    (run / "report.html").unlink()
    for png in (run / "plots").glob("*.png"):
        png.unlink()
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    after = (run / "report.html").read_text(encoding="utf-8")
    assert len(_embedded_pngs(after)) == 3
    strip = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")
    assert strip.sub("", after) == strip.sub("", before)


def test_report_of_a_non_run_fails_clearly(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_a_plot_is_written_whole_or_not_at_all(run, tmp_path, monkeypatch):
    """A full disk while lr.png is written: loss.png (written before) is a whole PNG, and no
    half-written lr.png or temporary file is left under any name."""
    import errno
    import os

    import tuneforge.paths as paths
    from tuneforge.errors import OutputError
    from tuneforge.reporting.plots import make_plots

    real, sizes = paths._write_fd, []

    def disk_full_on_the_second_file(fd: int, data: bytes) -> None:
        sizes.append(len(data))
        if len(sizes) == 2:
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(paths, "_write_fd", disk_full_on_the_second_file)
    with pytest.raises(OutputError, match=r"lr\.png: cannot write"):
        make_plots(_records(run), tmp_path / "plots")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.png"]
    whole = (tmp_path / "plots" / "loss.png").read_bytes()
    assert len(whole) == sizes[0] and whole.endswith(b"IEND\xaeB`\x82")


def test_tensorboard_has_the_logged_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/loss", "eval/bleu", "eval/exact_match"} <= tags
    train = [r for r in _records(run) if "lr" in r]
    logged = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in logged] == [r["step"] for r in train]
    assert [v for _, v in logged] == pytest.approx([r["loss"] for r in train], rel=1e-6)


def test_missing_tensorboard_fails_naming_the_key(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    data = write_toy_messages(tmp_path / "train.jsonl", n=16)
    cfg = write_run_config(
        tmp_path / "tb.yaml", tiny_model_dir, data, tmp_path / "run", log={"tensorboard": True}
    )
    assert main(["train", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "log.tensorboard" in err and "pip install" in err
    assert not (tmp_path / "run" / "tensorboard").exists()
