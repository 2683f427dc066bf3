"""The loop on the quickstart model: answer held-out reviews, correct the wrong ones, retrain.

Answers come from the run loaded in-process (not over HTTP) and go into the store as serve's
records would; prints held-out accuracy before and after, and the promotion decision. Needs
`make quickstart` first; minutes of CPU. Usage:
    python scripts/feedback_demo.py [--run runs/quickstart]
        [--data data/generated/sentiment/test.jsonl] [--limit 200] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path

from tuneforge.data.formats import load_examples
from tuneforge.feedback.store import FeedbackStore
from tuneforge.feedback.validate import FeedbackItem
from tuneforge.loading import generate, load_reference
from tuneforge.recipes.retrain import RetrainJob, run_retrain
from tuneforge.serve.records import ResponseRecord


def serve_and_rate(run: Path, data: Path, store: FeedbackStore, limit: int) -> float:
    """Answer each held-out row; a thumbs-down with the label as correction when it is wrong."""
    loaded = load_reference(run)
    examples = load_examples(data).examples[:limit]
    right = 0
    for ex in examples:
        messages = [m for m in ex.messages if m["role"] != "assistant"]
        label = ex.label or ex.messages[-1]["content"]
        start = time.time()
        answer = generate(loaded, messages[-1]["content"], max_new_tokens=8).strip()
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        store.write(ResponseRecord(
            id=rid, created=start, route="/v1/chat/completions", model=str(run), adapter="default",
            request={"messages": messages}, prompt=messages[-1]["content"], completion=answer,
            finish_reason="stop", prompt_tokens=0, completion_tokens=0,
            latency_s=time.time() - start, ttft_s=None, status=200, error=None,
        ))  # fmt: skip
        ok = answer == label
        right += ok
        item = FeedbackItem(rid, 1 if ok else -1, "thumbs", correction=None if ok else label)
        store.add_feedback(item)
    return right / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/quickstart")
    parser.add_argument("--data", default="data/generated/sentiment/test.jsonl")
    parser.add_argument("--db", help="default: RUN/serve/feedback.db")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    run = Path(args.run)
    db = args.db or str(run / "serve" / "feedback.db")
    store = FeedbackStore(db)
    accuracy = serve_and_rate(run, Path(args.data), store, args.limit)
    store.close()
    print(f"served accuracy on {args.limit} held-out reviews: {accuracy:.1%}")
    outcome = run_retrain(RetrainJob(run, db, min_new=1, steps=args.steps))
    print(f"{outcome.decision}: {outcome.reason}")
    print(json.dumps(outcome.metrics, indent=2))


if __name__ == "__main__":
    main()
