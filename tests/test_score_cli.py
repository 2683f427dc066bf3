"""`tuneforge score`: JSON shape, 0-100 scale, agreement with sacrebleu's CLI.

Metric math itself is tested in test_metrics.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge.cli import main as cli_main
from tuneforge.errors import DataError
from tuneforge.evaluation.score import META_KEY, score_files, score_texts


def main(argv):
    return cli_main(["score", *argv])


PAIRS = {
    "en": (
        [
            "The cat sat on the mat.",
            "He went to the market to buy some apples.",
            "The weather is nice today, so we walk in the park.",
            "Please close the door when you leave the room.",
            "It was raining heavily all night long.",
        ],
        [
            "The cat is sitting on the mat.",
            "He went to the market and bought apples.",
            "The weather is good today, so we are walking in the park.",
            "Please shut the door when you leave the room.",
            "It rained heavily the whole night.",
        ],
    ),
    "zh": (
        [
            "今天天气很好，我们去公园散步。",
            "他每天早上六点起床跑步。",
            "机器学习模型需要大量的数据来训练。",
            "请你离开房间的时候把门关上。",
            "这家餐厅的菜非常好吃，服务也很周到。",
        ],
        [
            "今天天气不错，我们去公园走走吧。",
            "他每天早晨六点钟起床去跑步。",
            "训练机器学习模型需要大量数据。",
            "离开房间时请把门关好。",
            "这家饭店的菜很好吃，服务也非常周到。",
        ],
    ),
}
ALL_KEYS = {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match"}


def write_pair(tmp_path: Path, lang: str) -> tuple[Path, Path]:
    preds, refs = PAIRS[lang]
    pred_path, ref_path = tmp_path / f"{lang}.hyp", tmp_path / f"{lang}.ref"
    pred_path.write_text("\n".join(preds) + "\n", encoding="utf-8")
    ref_path.write_text("\n".join(refs) + "\n", encoding="utf-8")
    return pred_path, ref_path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", "score", *args], capture_output=True, text=True
    )


def sacrebleu_cli(ref: Path, hyp: Path, *flags: str) -> float:
    script = Path(sys.executable).with_name("sacrebleu")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "sacrebleu"]
    out = subprocess.run(
        [*cmd, str(ref), "-i", str(hyp), *flags, "-b", "-w", "4"],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_json_output_has_metric_keys_on_0_100_scale_and_matches_sacrebleu(tmp_path, lang):
    hyp, ref = write_pair(tmp_path, lang)
    proc = run_cli(
        "--predictions", str(hyp), "--references", str(ref),
        "--metrics", "bleu,chrf,rouge,exact_match", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout)
    assert set(scores) == ALL_KEYS | {META_KEY}
    for name in ALL_KEYS:
        assert isinstance(scores[name], float)
        assert 0.0 <= scores[name] <= 100.0
    # On these fixtures every overlap metric is clearly above a 0-1 scale.
    assert min(scores[k] for k in ALL_KEYS - {"exact_match"}) > 1.0
    assert scores[META_KEY]["lang"] == lang  # detected: --lang defaults to auto
    tokenize = ["--tokenize", "zh"] if lang == "zh" else []
    assert scores["bleu"] == pytest.approx(
        sacrebleu_cli(ref, hyp, "-m", "bleu", *tokenize), abs=0.01
    )
    assert scores["chrf"] == pytest.approx(sacrebleu_cli(ref, hyp, "-m", "chrf"), abs=0.01)
    assert f"tok:{'zh' if lang == 'zh' else '13a'}" in scores[META_KEY]["signatures"]["bleu"]


def test_table_output_lists_scores_and_signatures(tmp_path, capsys):
    hyp, ref = write_pair(tmp_path, "zh")
    assert main(["--predictions", str(hyp), "--references", str(ref), "--lang", "zh"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["metric", "score"]
    names = [line.split()[0] for line in lines[1:6]]
    assert names == ["bleu", "chrf", "rouge1", "rouge2", "rougeL"]
    assert len({line.index(line.split()[1]) for line in lines[1:6]}) == 1  # one aligned column
    assert "bleu signature: nrefs:1|case:mixed|eff:no|tok:zh" in out
    assert "chrf signature: nrefs:1" in out


def test_unknown_metric_exits_2_with_allowed_list(tmp_path):
    hyp, ref = write_pair(tmp_path, "en")
    proc = run_cli("--predictions", str(hyp), "--references", str(ref), "--metrics", "bleu,meteor")
    assert proc.returncode == 2
    assert "meteor" in proc.stderr
    assert "allowed: bleu, chrf, rouge, exact_match" in proc.stderr
    assert proc.stdout == ""


def test_mismatched_line_counts_name_both_counts(tmp_path, capsys):
    hyp, ref = write_pair(tmp_path, "en")
    hyp.write_text("only one line\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"has 1 predictions, .* has 5 references"):
        score_files(hyp, ref, ["bleu"])
    assert main(["--predictions", str(hyp), "--references", str(ref)]) == 2
    assert "has 1 predictions" in capsys.readouterr().err


def test_missing_file_exits_2(tmp_path, capsys):
    hyp, _ = write_pair(tmp_path, "en")
    assert main(["--predictions", str(hyp), "--references", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt" in capsys.readouterr().err


def test_score_texts_meta_and_rouge_modes():
    preds, refs = PAIRS["zh"]
    word = score_texts(preds, refs, ["rouge"])
    char = score_texts(preds, refs, ["rouge"], lang="zh", zh_mode="char")
    assert set(word) == {"rouge1", "rouge2", "rougeL", META_KEY}
    assert word[META_KEY]["lang"] == "zh" and word[META_KEY]["n"] == 5
    assert "jieba" in word[META_KEY]["signatures"]["rouge"]
    assert word["rouge1"] != pytest.approx(char["rouge1"])
    with pytest.raises(ValueError, match="allowed"):
        score_texts(preds, refs, ["bleu", "accuracy"])
    with pytest.raises(ValueError, match="lang"):
        score_texts(preds, refs, ["bleu"], lang="fr")
