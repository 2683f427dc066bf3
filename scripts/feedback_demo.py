"""The loop on the quickstart model: answer reviews, rate the answers from the labels, retrain, compare.

Works on a copy of the run (OUT/run) and a fresh store (OUT/feedback.db), so the run and any
served store stay untouched. The copy is served by `tuneforge serve` on 127.0.0.1 (a fresh key,
its log in OUT/serve.log); reviews go through the official `openai` client and ratings through
POST /v1/feedback, as a real deployment's would. The first --serve rows of --data are the traffic
(thumbs up when the answer names the label; thumbs down with the label as the correction
otherwise); the next --eval rows are never fed back and measure held-out accuracy before and
after. Writes OUT/demo.json and OUT/demo.md. Needs `make quickstart` first; about 5-10 minutes
on 2 cores with the defaults. Usage (from the repository root):
    python scripts/feedback_demo.py [--run runs/quickstart]
        [--data data/generated/sentiment/test.jsonl] [--serve 120] [--eval 80] [--steps 30]
        [--out runs/quickstart-feedback-demo]
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI
from tqdm.auto import tqdm

from tuneforge.data.formats import Example, load_examples
from tuneforge.evaluation.metrics import match_label
from tuneforge.evaluation.runner import evaluate_examples
from tuneforge.feedback.store import FeedbackStore
from tuneforge.loading import load_reference
from tuneforge.paths import write_json_atomic, write_text_atomic
from tuneforge.recipes.retrain import RetrainJob, promoted_dir, run_retrain
from tuneforge.serve.auth import HASH_PREFIX, hash_key

PHASES = 5


class Progress:
    """One line per phase, with the seconds since the start."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def phase(self, n: int, text: str) -> None:
        print(f"[{n}/{PHASES} {time.monotonic() - self.start:6.1f}s] {text}", flush=True)


def answer_of(ex: Example) -> str:
    return ex.label if ex.label is not None else ex.messages[-1]["content"]


@contextmanager
def served(run: Path, db: str, out: Path) -> Iterator[tuple[str, str]]:
    """`tuneforge serve RUN` on a free 127.0.0.1 port with a fresh key; yields (base URL, key)."""
    key = secrets.token_urlsafe(24)
    keys = out / "serve.keys"
    keys.write_text(HASH_PREFIX + hash_key(key) + "\n", encoding="utf-8")
    keys.chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "tuneforge.cli", "serve", str(run), "--name", "demo",
            "--host", "127.0.0.1", "--port", str(port), "--api-key-file", str(keys), "--db", db]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with open(out / "serve.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"error: tuneforge serve did not start; see {out / 'serve.log'}"
                    )
                time.sleep(0.5)
            yield url, key
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def serve_and_rate(
    url: str, key: str, rows: list[Example], labels: list[str], quiet: bool
) -> float:
    """Ask the server each row (greedy, through the openai client); thumbs up when the answer names
    the label, else thumbs down + the label as the correction, POSTed to /v1/feedback. Returns the
    share answered right (by generation, as a user would see it)."""
    client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
    auth = {"Authorization": f"Bearer {key}"}
    right = 0
    for ex in tqdm(rows, desc="serve", unit="review", disable=quiet):
        messages = [m for m in ex.messages if m["role"] != "assistant"]
        label = answer_of(ex)
        reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=6, temperature=0)  # fmt: skip
        ok = match_label((reply.choices[0].message.content or "").strip(), labels) == label
        right += ok
        body = {"response_id": reply.id, "rating": 1 if ok else -1, "scale": "thumbs",
                "correction": None if ok else label, "idempotency_key": uuid.uuid4().hex}  # fmt: skip
        httpx.post(url + "/v1/feedback", json=body, headers=auth, timeout=60).raise_for_status()
    return right / len(rows)


def accuracy(run: Path, rows: list[Example], labels: list[str]) -> float:
    """Held-out accuracy in percent: the most likely label (as `tuneforge eval --metrics accuracy`)."""
    loaded = load_reference(run)
    return evaluate_examples(loaded.model, loaded.tokenizer, rows, ["accuracy"], labels=labels)["accuracy"]  # fmt: skip


def prepare(args: argparse.Namespace) -> tuple[Path, list[Example], list[Example], list[str]]:
    """OUT/run (a fresh copy of the run) and the traffic / held-out rows of --data."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: --out {out} exists; remove it or pass --overwrite")
    shutil.rmtree(out, ignore_errors=True)
    ignore = shutil.ignore_patterns("retrain", "promoted", "serve", "checkpoint*", "plots")
    shutil.copytree(args.run, out / "run", ignore=ignore)
    examples = load_examples(args.data).examples
    if len(examples) < args.serve + args.eval:
        raise SystemExit(f"error: --data {args.data} has {len(examples)} rows; --serve + --eval need {args.serve + args.eval}")  # fmt: skip
    traffic, held = examples[: args.serve], examples[args.serve : args.serve + args.eval]
    labels = sorted({answer_of(ex) for ex in examples})
    return out, traffic, held, labels


def markdown(result: dict[str, Any]) -> str:
    b, a = result["heldout_accuracy_before"], result["heldout_accuracy_after"]
    rows = [
        ("served answers right (generation, traffic rows)", f"{result['served_accuracy']:.1%}"),
        (f"held-out accuracy before ({result['eval_rows']} rows)", f"{b:.1f} %"),
        ("held-out accuracy of the candidate", f"{result['candidate_accuracy']:.1f} %"),
        ("held-out accuracy after (the served model)", f"{a:.1f} %"),
        ("decision", result["decision"]),
    ]
    gates = [f"| {g['set']} {g['metric']} | {g['parent']:.4f} | {g['candidate']:.4f} | {g['rule']} {g['threshold']:g} | {'pass' if g['passed'] else 'FAIL'} |"  # fmt: skip
             for g in result["gates"]]  # fmt: skip
    return "\n".join(
        ["# Feedback loop demonstration", "", f"Run: `{result['run']}`, data: `{result['data']}`, "
         f"{result['feedback_rows']} feedback rows, {result['steps']} retrain steps, "
         f"{result['seconds']:.0f} s.", "", "| measure | value |", "| --- | --- |",
         *(f"| {k} | {v} |" for k, v in rows), "", f"Reason: {result['reason']}", "",
         "| gate | parent | candidate | allowed | verdict |", "| --- | --- | --- | --- | --- |",
         *gates, ""]
    )  # fmt: skip


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    clock = Progress()
    out, traffic, held, labels = prepare(args)
    run, db = out / "run", f"sqlite:///{(out / 'feedback.db').resolve()}"
    clock.phase(1, f"copied {args.run} to {run}; {len(traffic)} traffic rows, {len(held)} held-out rows, labels {labels}")  # fmt: skip
    with served(run, db, out) as (url, key):
        right = serve_and_rate(url, key, traffic, labels, args.quiet)
    store = FeedbackStore(db)
    n_feedback = len(store.feedback())
    store.close()
    clock.phase(2, f"served {len(traffic)} reviews over HTTP, {right:.1%} right; {n_feedback} feedback rows")  # fmt: skip
    before = accuracy(run, held, labels)
    clock.phase(3, f"held-out accuracy before: {before:.1f} %")
    job = RetrainJob(run, db, min_new=1, steps=args.steps, max_drop={"accuracy": args.max_drop},
                     show_progress=not args.quiet)  # fmt: skip
    outcome = run_retrain(job)
    clock.phase(4, f"retrain: {outcome.decision}: {outcome.reason}")
    candidate = accuracy(outcome.attempt_dir / "candidate", held, labels) if outcome.attempt_dir else before  # fmt: skip
    after = candidate if outcome.decision == "promoted" else before
    result = {
        "run": str(args.run), "data": str(args.data), "traffic_rows": len(traffic),
        "eval_rows": len(held), "feedback_rows": n_feedback, "steps": args.steps,
        "served_accuracy": right, "heldout_accuracy_before": before,
        "candidate_accuracy": candidate, "heldout_accuracy_after": after,
        "decision": outcome.decision, "reason": outcome.reason,
        "served_after": str(promoted_dir(run)), "gates": outcome.metrics.get("gates", []),
        "metrics": outcome.metrics, "seconds": time.monotonic() - clock.start,
    }  # fmt: skip
    write_json_atomic(out / "demo.json", result)
    write_text_atomic(out / "demo.md", markdown(result))
    clock.phase(5, f"held-out accuracy after: {after:.1f} % ({outcome.decision}); wrote {out / 'demo.json'} and {out / 'demo.md'}")  # fmt: skip
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/quickstart")
    parser.add_argument("--data", default="data/generated/sentiment/test.jsonl")
    parser.add_argument("--serve", type=int, default=120, help="traffic rows (answered, rated)")
    parser.add_argument("--eval", type=int, default=80, help="held-out rows after them")
    parser.add_argument("--steps", type=int, default=30, help="retrain steps")
    parser.add_argument("--max-drop", type=float, default=2.0, help="accuracy gate, points")
    parser.add_argument("--out", default="runs/quickstart-feedback-demo")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_demo(parse_args())
