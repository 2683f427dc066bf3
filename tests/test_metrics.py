"""Metric functions checked against sacrebleu's CLI, rouge_score, rouge_chinese and hand counts.

CLI-level behaviour of `tuneforge score` is in test_score_cli.py.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import jieba
import pytest
from rouge_chinese import Rouge
from rouge_score.rouge_scorer import RougeScorer

from tuneforge.evaluation.lang import cjk_share, detect_lang
from tuneforge.evaluation.metrics import (
    classification_report,
    exact_match,
    match_label,
    perplexity,
    token_accuracy,
)
from tuneforge.evaluation.textmetrics import bleu, chrf, rouge, segment_zh

EN_PREDS = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over a lazy dog.",
    "He went to the market to buy some apples.",
    "The weather is nice today, so we walk in the park.",
    "She is reading a book about ancient history.",
    "Machine learning models need a lot of data.",
    "Please close the door when you leave the room.",
    "It was raining heavily all night long.",
]
EN_REFS = [
    "The cat is sitting on the mat.",
    "The quick brown fox jumps over the lazy dog.",
    "He went to the market and bought apples.",
    "The weather is good today, so we are walking in the park.",
    "She reads a book on ancient history.",
    "Machine learning models require large amounts of data.",
    "Please shut the door when you leave the room.",
    "It rained heavily the whole night.",
]
ZH_PREDS = [
    "今天天气很好，我们去公园散步。",
    "这本书的质量太差了，我很失望。",
    "他每天早上六点起床跑步。",
    "机器学习模型需要大量的数据来训练。",
    "请你离开房间的时候把门关上。",
    "我喜欢在周末和朋友一起看电影。",
    "这家餐厅的菜非常好吃，服务也很周到。",
    "昨天晚上下了一整夜的大雨。",
]
ZH_REFS = [
    "今天天气不错，我们去公园走走吧。",
    "这本书质量很差，让我非常失望。",
    "他每天早晨六点钟起床去跑步。",
    "训练机器学习模型需要大量数据。",
    "离开房间时请把门关好。",
    "周末我喜欢跟朋友们一起去看电影。",
    "这家饭店的菜很好吃，服务也非常周到。",
    "昨晚下了一整夜大雨。",
]
CASES = {"en": (EN_PREDS, EN_REFS), "zh": (ZH_PREDS, ZH_REFS)}


def sacrebleu_cli(tmp_path: Path, preds: list[str], refs: list[str], *flags: str) -> float:
    """Score with sacrebleu's own command line (`sacrebleu REF -i HYP ... -b -w 4`)."""
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("\n".join(preds) + "\n", encoding="utf-8")
    ref.write_text("\n".join(refs) + "\n", encoding="utf-8")
    script = Path(sys.executable).with_name("sacrebleu")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "sacrebleu"]
    out = subprocess.run(
        [*cmd, str(ref), "-i", str(hyp), *flags, "-b", "-w", "4"],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


# --- BLEU / chrF against the sacrebleu CLI ---------------------------------------------------


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_bleu_equals_sacrebleu_cli(tmp_path, lang):
    preds, refs = CASES[lang]
    flags = ["-m", "bleu"] + (["--tokenize", "zh"] if lang == "zh" else [])
    expected = sacrebleu_cli(tmp_path, preds, refs, *flags)
    result = bleu(preds, refs, lang)
    assert 5 < expected < 95  # the fixture is neither trivial nor disjoint
    assert result["bleu"] == pytest.approx(expected, abs=0.01)
    assert f"tok:{'zh' if lang == 'zh' else '13a'}" in result["signature"]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_chrf_equals_sacrebleu_cli(tmp_path, lang):
    preds, refs = CASES[lang]
    expected = sacrebleu_cli(tmp_path, preds, refs, "-m", "chrf")
    result = chrf(preds, refs)
    assert 5 < expected < 95
    assert result["chrf"] == pytest.approx(expected, abs=0.01)
    assert "nc:6" in result["signature"]


def test_chinese_bleu_needs_zh_tokenizer():
    # With 13a an unspaced Chinese sentence is one token: the score collapses.
    assert bleu(ZH_PREDS, ZH_REFS, "zh")["bleu"] > bleu(ZH_PREDS, ZH_REFS, "en")["bleu"] + 10


def test_bleu_rejects_misaligned_and_unknown_lang():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        bleu(["a", "b"], ["a"], "en")
    with pytest.raises(ValueError, match="lang"):
        bleu(["a"], ["a"], "fr")


# --- ROUGE against rouge_score and rouge_chinese ----------------------------------------------


def test_english_rouge_equals_rouge_score():
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    pairs = [scorer.score(r, p) for p, r in zip(EN_PREDS, EN_REFS, strict=True)]
    result = rouge(EN_PREDS, EN_REFS, "en")
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = 100 * sum(s[key].fmeasure for s in pairs) / len(pairs)
        assert result[key] == pytest.approx(expected, abs=1e-9)
    assert 20 < result["rouge1"] < 95


def test_chinese_rouge_is_nonzero_and_equals_rouge_chinese():
    jieba.setLogLevel(60)
    hyps = [" ".join(jieba.cut(p)) for p in ZH_PREDS]
    refs = [" ".join(jieba.cut(r)) for r in ZH_REFS]
    expected = Rouge().get_scores(hyps, refs, avg=True)
    result = rouge(ZH_PREDS, ZH_REFS, "zh")
    assert result["rouge1"] == pytest.approx(100 * expected["rouge-1"]["f"], abs=1e-9)
    assert result["rouge2"] == pytest.approx(100 * expected["rouge-2"]["f"], abs=1e-9)
    assert result["rougeL"] == pytest.approx(100 * expected["rouge-l"]["f"], abs=1e-9)
    assert min(result.values()) > 10
    # The trap this guards against: rouge_score's tokenizer drops CJK and reads 0.
    assert rouge(ZH_PREDS, ZH_REFS, "en")["rouge1"] == 0.0


def test_chinese_char_mode_equals_rouge_chinese_on_characters_and_differs_from_words():
    hyps = [" ".join(c for c in p if not c.isspace()) for p in ZH_PREDS]
    refs = [" ".join(c for c in r if not c.isspace()) for r in ZH_REFS]
    expected = Rouge().get_scores(hyps, refs, avg=True)
    char = rouge(ZH_PREDS, ZH_REFS, "zh", zh_mode="char")
    word = rouge(ZH_PREDS, ZH_REFS, "zh", zh_mode="word")
    assert char["rouge1"] == pytest.approx(100 * expected["rouge-1"]["f"], abs=1e-9)
    assert char["rougeL"] == pytest.approx(100 * expected["rouge-l"]["f"], abs=1e-9)
    assert abs(char["rouge1"] - word["rouge1"]) > 1


def test_chinese_rouge_counts_an_empty_prediction_as_zero():
    full = rouge(ZH_PREDS[:2], ZH_REFS[:2], "zh")
    half = rouge([ZH_PREDS[0], ""], ZH_REFS[:2], "zh")
    first = rouge(ZH_PREDS[:1], ZH_REFS[:1], "zh")
    assert half["rouge1"] == pytest.approx(first["rouge1"] / 2)
    assert half["rouge1"] < full["rouge1"]
    assert rouge([""], ["你好"], "zh") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_segment_zh_char_mode_keeps_latin_words_whole():
    assert segment_zh("我用GPU训练。", "char") == "我 用 GPU 训 练 。"
    with pytest.raises(ValueError, match="zh_mode"):
        segment_zh("你好", "letters")


# --- language detection ------------------------------------------------------------------------


def test_detect_lang():
    assert detect_lang(ZH_REFS) == "zh"
    assert detect_lang(EN_REFS) == "en"
    assert detect_lang(["我们用 PyTorch 训练模型"]) == "zh"  # 7 CJK of 14 letters
    assert detect_lang(["The model is called 通义 in Chinese press releases"]) == "en"
    assert detect_lang(["1234 !!"]) == "en"
    assert detect_lang([]) == "en"
    assert cjk_share(["ab中文"]) == pytest.approx(0.5)


# --- perplexity, token accuracy, exact match --------------------------------------------------


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(20.0)) == pytest.approx(20.0)
    assert perplexity(700.0) == pytest.approx(math.exp(700.0))
    assert perplexity(710.0) == math.inf
    assert perplexity(1e9) == math.inf
    assert math.isnan(perplexity(math.nan))


def test_token_accuracy():
    assert token_accuracy(3, 4) == 75.0
    assert token_accuracy(0, 5) == 0.0
    with pytest.raises(ValueError, match="total"):
        token_accuracy(0, 0)
    with pytest.raises(ValueError, match="outside"):
        token_accuracy(5, 4)


def test_exact_match():
    preds = ["Paris.", "  the  Eiffel tower ", "北京。", "42", "Ｐａｒｉｓ"]
    refs = ["paris", "The Eiffel Tower", "北京", "43", "Paris"]
    assert exact_match(preds, refs) == pytest.approx(80.0)
    assert exact_match(preds, refs, normalize=False) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])


# --- classification ----------------------------------------------------------------------------


def test_classification_report_by_hand():
    labels = ["pos", "neg", "neu"]
    refs = ["pos", "pos", "pos", "neg", "neg", "neu"]
    preds = ["pos", "neg", None, "neg", "maybe", "pos"]
    # pos: tp=1 fp=1 fn=2 -> F1 = 2/(2+1+2) = 0.4
    # neg: tp=1 fp=1 fn=1 -> F1 = 2/4 = 0.5
    # neu: tp=0 fp=0 fn=1 -> F1 = 0
    report = classification_report(preds, refs, labels)
    assert report["accuracy"] == pytest.approx(100 * 2 / 6)
    assert report["macro_f1"] == pytest.approx(100 * (0.4 + 0.5 + 0.0) / 3)


def test_classification_report_perfect_and_label_without_examples():
    assert classification_report(["a", "b"], ["a", "b"], ["a", "b"]) == {
        "accuracy": 100.0,
        "macro_f1": 100.0,
    }
    # "c" has no example and no prediction: it still counts, with F1 0.
    report = classification_report(["a", "b"], ["a", "b"], ["a", "b", "c"])
    assert report["macro_f1"] == pytest.approx(200 / 3)


def test_classification_report_macro_f1_by_hand():
    # Per label (as sklearn's f1_score(average="macro", zero_division=0) computes it):
    # 正面 P 2/3 R 1 -> F1 0.8; 负面 P 2/3 R 2/3 -> 2/3; 中性 never predicted -> 0.
    labels = ["正面", "负面", "中性"]
    refs = ["正面", "负面", "负面", "中性", "正面", "中性", "负面"]
    preds = ["正面", "正面", "负面", "其他", "正面", "负面", "负面"]
    report = classification_report(preds, refs, labels)
    assert report["macro_f1"] == pytest.approx(100 * (0.8 + 2 / 3 + 0) / 3)
    assert report["accuracy"] == pytest.approx(100 * 4 / 7)


def test_classification_report_rejects_reference_outside_labels():
    with pytest.raises(ValueError, match="reference 1 is 'x'"):
        classification_report(["a", "a"], ["a", "x"], ["a", "b"])


# --- match_label ---------------------------------------------------------------------------------

EN_LABELS = ["positive", "negative", "neutral"]
ZH_LABELS = ["正面", "负面"]


@pytest.mark.parametrize(
    "generated, labels, expected",
    [
        ("Positive", EN_LABELS, "positive"),
        ("  **NEGATIVE**. The review is not positive.", EN_LABELS, "negative"),
        ("The sentiment of this review is neutral.", EN_LABELS, "neutral"),
        ("positive or negative, hard to say", EN_LABELS, "positive"),  # the start wins
        ("It could be positive or negative.", EN_LABELS, None),  # ambiguous
        ("I cannot tell.", EN_LABELS, None),
        ("", EN_LABELS, None),
        ("This is nonpositive", EN_LABELS, None),  # not a whole word
        ("positively glowing", EN_LABELS, None),
        ("Very positive!", ["positive", "very positive"], "very positive"),
        ("I'd say very positive.", ["positive", "very positive"], "very positive"),
        ("Label: Yes", ["Yes", "No"], "Yes"),  # returned as spelled in the label set
        ("负面", ZH_LABELS, "负面"),
        ("这条评论是正面的。", ZH_LABELS, "正面"),  # no spaces around Chinese words
        ("「正面」评价", ZH_LABELS, "正面"),
        ("不是正面而是负面", ZH_LABELS, None),
        ("答案：负面，不是正面", ZH_LABELS, None),  # both after the start: ambiguous
        ("Sentiment: 正面", ZH_LABELS, "正面"),
    ],
)
def test_match_label(generated, labels, expected):
    assert match_label(generated, labels) == expected


def test_match_label_rejects_empty_label():
    with pytest.raises(ValueError, match="empty"):
        match_label("yes", ["yes", " "])
