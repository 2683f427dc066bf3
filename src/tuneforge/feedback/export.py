"""Feedback out: `messages` rows for SFT, `{prompt, chosen, rejected}` pairs, KTO rows, PII filter.

Every row carries the feedback ids it came from. Writing files and recording the export in the
store happen in `export_feedback`; the rules that pick rows are pure functions above it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.data.formats import write_jsonl
from tuneforge.errors import FeedbackError

PII_MODES = ("drop", "redact", "keep")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# +, digits, spaces, dots, dashes, brackets; 7-15 digits in all (E.164 allows 15)
_PHONE = re.compile(r"(?<![\w.])\+?\(?\d[\d\s().-]{5,18}\d(?![\w.])")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")


def _luhn(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _phone_like(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    grouped = bool(re.search(r"[\s().-]", match.strip())) or match.startswith("+")
    return 7 <= len(digits) <= 15 and (grouped or len(digits) >= 10)


def find_pii(text: str) -> list[str]:
    """Which kinds of PII-looking strings `text` holds: "email", "card" (13-19 digits passing
    the Luhn check), "phone" (7-15 digits, grouped or starting with +, or 10+ in a row)."""
    kinds = []
    if _EMAIL.search(text):
        kinds.append("email")
    cards = [m for m in _CARD.findall(text) if _luhn(re.sub(r"\D", "", m))]
    if cards:
        kinds.append("card")
    rest = _CARD.sub(" ", text) if cards else text
    if any(_phone_like(m) for m in _PHONE.findall(_EMAIL.sub(" ", rest))):
        kinds.append("phone")
    return kinds


def redact(text: str) -> str:
    """`text` with each PII-looking string replaced by [EMAIL], [CARD] or [PHONE]."""
    text = _EMAIL.sub("[EMAIL]", text)
    text = _CARD.sub(lambda m: "[CARD]" if _luhn(re.sub(r"\D", "", m[0])) else m[0], text)
    return _PHONE.sub(lambda m: "[PHONE]" if _phone_like(m[0]) else m[0], text)


def conversation(response: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation a response answered (chat messages, or a completion prompt as a user turn)."""
    request = response.get("request") or {}
    messages = request.get("messages")
    if isinstance(messages, list):
        turns = [
            {"role": m["role"], "content": m["content"]}
            for m in messages
            if isinstance(m, dict)
            and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
        ]
        return turns if turns and turns[-1]["role"] == "user" else []
    prompt = request.get("prompt")
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) and prompt else []


@dataclass
class Export:
    sft: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    kto: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)

    def feedback_ids(self, kind: str) -> list[int]:
        return sorted({i for row in getattr(self, kind) for i in row["feedback_ids"]})


def _screen(texts: Sequence[str], pii: str, dropped: Counter) -> bool:
    """False when the row must go (PII under "drop"); counts the reason."""
    if pii == "keep":
        return True
    kinds = sorted({k for t in texts for k in find_pii(t)})
    if kinds and pii == "drop":
        dropped.update(f"pii_{k}" for k in kinds)
        return False
    return True


def _clean(value: Any, pii: str) -> Any:
    if pii != "redact":
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return [{**m, "content": redact(m["content"])} for m in value]
    return value


def _add(rows: list, row: dict[str, Any], texts: Sequence[str], pii: str, dropped: Counter) -> None:
    if _screen(texts, pii, dropped):
        rows.append({k: _clean(v, pii) for k, v in row.items()})


def build_export(
    feedback: Iterable[dict[str, Any]], min_score: float = 0.75, pii: str = "drop"
) -> Export:
    """Rows from feedback (each with its `response`), in feedback id order.

    SFT: a correction as the answer; else the served answer when its score >= `min_score`.
    Pairs: correction (chosen) over the served answer; and, among answers to one conversation,
    the best-rated over the worst-rated. KTO: each rated answer, good when score > 0.5
    (neutral 3-star ratings are left out), corrections as good answers.
    """
    if pii not in PII_MODES:
        raise FeedbackError(f"--pii: {pii!r} is not one of {', '.join(PII_MODES)}")
    out = Export()
    by_prompt: dict[str, list[tuple[float, str, int]]] = {}
    for f in sorted(feedback, key=lambda f: f["id"]):
        resp, ids = f["response"], [f["id"]]
        conv = conversation(resp)
        if not conv:
            out.dropped["no_prompt"] += 1
            continue
        texts = [m["content"] for m in conv]
        answer, correction = resp["completion"], f["correction"]
        ok = resp["status"] < 400 and answer.strip()
        if correction:
            row = {"messages": [*conv, {"role": "assistant", "content": correction}]}
            _add(out.sft, {**row, "feedback_ids": ids}, [*texts, correction], pii, out.dropped)
            _add(out.kto, {"prompt": conv, "completion": correction, "label": True, "feedback_ids": ids}, [*texts, correction], pii, out.dropped)  # fmt: skip
            if ok and answer != correction:
                pair = {
                    "prompt": conv,
                    "chosen": correction,
                    "rejected": answer,
                    "feedback_ids": ids,
                }
                _add(out.pairs, pair, [*texts, correction, answer], pii, out.dropped)
        elif ok and f["score"] >= min_score:
            row = {
                "messages": [*conv, {"role": "assistant", "content": answer}],
                "feedback_ids": ids,
            }
            _add(out.sft, row, [*texts, answer], pii, out.dropped)
        elif not ok:
            out.dropped["failed_response"] += 1
        if ok and f["score"] != 0.5:
            kto = {
                "prompt": conv,
                "completion": answer,
                "label": f["score"] > 0.5,
                "feedback_ids": ids,
            }
            _add(out.kto, kto, [*texts, answer], pii, out.dropped)
        if ok:
            by_prompt.setdefault(json.dumps(conv, sort_keys=True), []).append(
                (f["score"], answer, f["id"])
            )
    _rated_pairs(by_prompt, out, pii)
    return out


def _rated_pairs(by_prompt: dict[str, list[tuple[float, str, int]]], out: Export, pii: str) -> None:
    for key, rated in by_prompt.items():
        best, worst = max(rated, key=lambda r: r[0]), min(rated, key=lambda r: r[0])
        if best[0] > worst[0] and best[1] != worst[1]:
            conv = json.loads(key)
            pair = {"prompt": conv, "chosen": best[1], "rejected": worst[1], "feedback_ids": sorted({best[2], worst[2]})}  # fmt: skip
            _add(
                out.pairs,
                pair,
                [*(m["content"] for m in conv), best[1], worst[1]],
                pii,
                out.dropped,
            )


def parse_since(text: str | None, now: float | None = None) -> float:
    """`--since`: an ISO date/time (UTC unless it says), a span back from now (30m, 24h, 7d),
    or Unix seconds. None means the beginning."""
    if text is None:
        return 0.0
    now = time.time() if now is None else now
    span = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if span:
        return now - float(span[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[span[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise FeedbackError(
            f"--since: {text!r} is not an ISO date (2026-01-31), a span (7d, 24h) or Unix seconds"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()


def check_options(min_score: float, pii: str) -> None:
    if not 0.0 <= min_score <= 1.0:
        raise FeedbackError(f"--min-rating: {min_score} is not a score between 0 and 1")
    if pii not in PII_MODES:
        raise FeedbackError(f"--pii: {pii!r} is not one of {', '.join(PII_MODES)}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_feedback(
    store,
    out: str | Path,
    *,
    pairs: str | Path | None = None,
    kto: str | Path | None = None,
    since: float = 0.0,
    min_score: float = 0.75,
    pii: str = "drop",
) -> dict[str, Any]:
    """Write the SFT file (and the pairs / KTO files when asked); record each in the store."""
    check_options(min_score, pii)
    built = build_export(store.feedback(since), min_score, pii)
    filters = {"since": since, "min_score": min_score, "pii": pii}
    written: dict[str, Any] = {"dropped": dict(built.dropped)}
    for kind, path in (("sft", out), ("pairs", pairs), ("kto", kto)):
        if path is None:
            continue
        rows = getattr(built, kind)
        path = write_jsonl(path, rows)
        digest = _sha256(path)
        ids = built.feedback_ids(kind)
        written[kind] = {
            "path": str(path),
            "rows": len(rows),
            "sha256": digest,
            "feedback_ids": ids,
            "dataset_id": store.record_export(kind, str(path.resolve()), digest, ids, filters),
        }
    return written
