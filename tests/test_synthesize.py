"""Synthesis: the filters (near-duplicates, labels, language, length), the self-instruct loop with a
scripted generator, and `tuneforge synthesize` end to end on a tiny model."""

import json

import pytest

from tuneforge.augment.synth import (
    Candidate,
    Filters,
    Seed,
    SynthSettings,
    clean,
    rouge_l,
    synthesize_candidates,
)
from tuneforge.cli import main

EXISTING = ["Write a short poem about the sea at night.", "这本书的质量非常好，我很喜欢。"]


def test_rouge_l_counts_han_characters_and_english_words():
    assert rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert rouge_l("这本书很好", "这本书不好") == pytest.approx(0.8)  # LCS 4 of 5 characters
    assert rouge_l("a b c d", "a x c y") == pytest.approx(0.5)
    assert rouge_l("", "abc") == 0.0


def test_filters_reject_a_near_duplicate_and_a_wrong_label():
    f = Filters(EXISTING, labels={"positive", "negative"}, lang=None, max_similarity=0.7)
    near = Candidate("Write a short poem about the sea at dawn.", "positive")
    assert rouge_l(near.text, EXISTING[0]) >= 0.7
    assert f.reason(near) == "too_similar"
    assert f.reason(Candidate("这本书的质量非常好，我很喜欢！", "positive")) == "too_similar"
    assert f.reason(Candidate("A completely new text about trains.", "neutral")) == "invalid_label"
    assert f.reason(Candidate("Another new text about trains.", "positive", "negative")) == (
        "label_mismatch"
    )
    assert f.reason(Candidate("write a SHORT poem  about the sea at night.", "positive")) == (
        "duplicate"
    )
    assert f.reason(Candidate("hi", "positive")) == "length"
    assert f.keep(Candidate("A completely new text about trains.", "negative"))
    # What was kept now counts as existing.
    assert f.reason(Candidate("A completely new text about trains!", "negative")) == "too_similar"
    assert dict(f.rejected) == {}  # reason() only asks; keep() counts


def test_filters_check_the_language():
    f = Filters([], lang="zh")
    assert f.reason(Candidate("An English sentence, not Chinese.")) == "language"
    assert f.reason(Candidate("一个全新的中文句子。")) is None


def test_clean_strips_numbering_and_reads_a_declared_label():
    assert clean('  5. "Plan a trip to Rome."\n\nMore text') == ("Plan a trip to Rome.", None)
    assert clean("Task: Name three rivers.") == ("Name three rivers.", None)
    assert clean("The food was cold.\nLabel: negative") == ("The food was cold.", "negative")


def test_self_instruct_loop_with_a_scripted_generator():
    seeds = [Seed(f"Seed task number {i} about topic {i}.", None, f"s.jsonl:{i}") for i in range(6)]
    outputs = iter(
        [
            "1. Explain how rainbows form.",
            "Seed task number 1 about topic 1.",  # exact copy of a seed
            "Explain how rainbows form in the sky.",  # near-duplicate of the first
            "Describe the life cycle of a frog.",
            "List three uses of copper.",
        ]
    )
    seen_prompts = []

    def generate(prompts):
        seen_prompts.extend(prompts)
        return [next(outputs) for _ in prompts]

    f = Filters([s.prompt for s in seeds], lang="en")
    kept, made = synthesize_candidates(
        seeds, generate, f, SynthSettings(n=3, batch_size=1, shots=2)
    )
    assert [c.text for c in kept] == [
        "Explain how rainbows form.",
        "Describe the life cycle of a frog.",
        "List three uses of copper.",
    ]
    assert made == 5 and dict(f.rejected) == {"duplicate": 1, "too_similar": 1}
    assert all(len(c.seeds) == 2 and c.seeds[0].startswith("s.jsonl:") for c in kept)
    assert "Seed task number" in seen_prompts[0][0]["content"]


def test_label_mode_cycles_labels_and_shows_seeds_of_that_label():
    seeds = [Seed("good film", "pos", "s:1"), Seed("bad film", "neg", "s:2")]
    prompts = []
    words = iter("apples bridges castles dolphins engines forests glaciers harbours".split() * 2)

    def generate(batch):
        prompts.extend(batch)
        return [next(words) for _ in batch]

    kept, _ = synthesize_candidates(
        seeds, generate, Filters([], labels={"pos", "neg"}), SynthSettings(n=4), ["pos", "neg"]
    )
    assert [c.label for c in kept] == ["pos", "neg", "pos", "neg"]
    assert "good film" in prompts[0][0]["content"] and "bad film" not in prompts[0][0]["content"]
    assert '"neg"' in prompts[1][0]["content"]


def _seed_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, one_thread, capsys):
    seeds = _seed_file(
        tmp_path / "seeds.jsonl",
        [
            {"text": f"review number {i} of a book", "label": ["good", "bad"][i % 2]}
            for i in range(6)
        ],
    )
    argv = ["synthesize", "--model", str(tiny_model_dir), "--seed-data", str(seeds), "--n", "3"]
    argv += ["--lang", "any", "--min-chars", "1", "--max-new-tokens", "8", "--batch-size", "4"]
    argv += ["--quiet", "--similarity", "1.0"]
    assert main([*argv, "--out", str(tmp_path / "a.jsonl")]) == 0
    assert "generated rows/s" in capsys.readouterr().out
    assert main([*argv, "--out", str(tmp_path / "b.jsonl")]) == 0
    a = (tmp_path / "a.jsonl").read_text()
    assert a == (tmp_path / "b.jsonl").read_text()  # seeded sampling
    rows = [json.loads(x) for x in a.splitlines()]
    assert 1 <= len(rows) <= 3
    for row in rows:
        assert set(row) == {"text", "label", "provenance"} and row["label"] in {"good", "bad"}
        prov = row["provenance"]
        assert prov["model"] == str(tiny_model_dir) and prov["sampling"]["temperature"] == 0.9
        assert all(s.startswith(str(seeds)) for s in prov["seeds"])
    stats = json.loads((tmp_path / "a.stats.json").read_text())
    assert stats["kept"] == len(rows) and stats["generated"] >= len(rows)


def test_cli_refuses_an_unknown_label(tmp_path, tiny_model_dir, capsys):
    seeds = _seed_file(tmp_path / "s.jsonl", [{"text": "a good book", "label": "good"}])
    argv = ["synthesize", "--model", str(tiny_model_dir), "--seed-data", str(seeds)]
    assert main([*argv, "--n", "1", "--labels", "meh", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "'meh' is no label of the seeds" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
