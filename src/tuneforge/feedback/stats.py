"""Monitoring numbers from stored responses and feedback: traffic, errors, latency, ratings, tags.

Pure functions over the rows the store returns; the alert rule is stated once, here. Drawing
them is dashboard.py's job, drift of the inputs is drift.py's.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

#: The rating alert: the mean score (0..1) of the newest RATING_WINDOW ratings is more than
#: RATING_DROP below the mean of the RATING_WINDOW before them.
RATING_WINDOW = 50
RATING_DROP = 0.10
#: The error alert: more than ERROR_RATE_LIMIT of the requests in the newest bucket failed.
ERROR_RATE_LIMIT = 0.05
ALERT_RULE = (
    f"rating: mean score of the last {RATING_WINDOW} ratings more than {RATING_DROP:.2f} below "
    f"the {RATING_WINDOW} before; errors: over {ERROR_RATE_LIMIT:.0%} of the newest bucket's "
    "requests failed; drift: see the drift rule"
)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation), NaN for no values."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else math.nan


def bucket_edges(start: float, end: float, buckets: int) -> np.ndarray:
    """`buckets` equal spans covering [start, end] (one second at least)."""
    end = max(end, start + 1.0)
    return np.linspace(start, end, buckets + 1)


def _bucket_of(edges: np.ndarray, t: float) -> int:
    return int(min(max(np.searchsorted(edges, t, side="right") - 1, 0), len(edges) - 2))


def traffic(responses: Sequence[dict[str, Any]], edges: np.ndarray) -> list[dict[str, Any]]:
    """Per bucket: requests, errors (status >= 400), latency p50 / p95 of successful ones."""
    rows = [{"start": float(edges[i]), "requests": 0, "errors": 0, "lat": []} for i in range(len(edges) - 1)]  # fmt: skip
    for r in responses:
        b = rows[_bucket_of(edges, r["created"])]
        b["requests"] += 1
        if r["status"] >= 400:
            b["errors"] += 1
        else:
            b["lat"].append(r["latency_s"])
    for b in rows:
        lat = b.pop("lat")
        b["p50_s"], b["p95_s"] = percentile(lat, 50), percentile(lat, 95)
    return rows


def rating_series(
    feedback: Sequence[dict[str, Any]], edges: np.ndarray
) -> dict[str, list[dict[str, Any]]]:
    """Per model/adapter: the mean score and count of the ratings in each bucket."""
    sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for f in feedback:
        resp = f["response"]
        name = resp["model"] + (f"/{resp['adapter']}" if resp.get("adapter") else "")
        sums[name][_bucket_of(edges, f["created"])].append(f["score"])
    return {
        name: [
            {"start": float(edges[i]), "mean_score": float(np.mean(v)), "ratings": len(v)}
            for i, v in sorted(by_bucket.items())
        ]
        for name, by_bucket in sorted(sums.items())
    }


def top_tags(feedback: Sequence[dict[str, Any]], n: int = 10) -> list[tuple[str, int]]:
    return Counter(tag for f in feedback for tag in f["tags"]).most_common(n)


def rating_alert(
    scores: Sequence[float], window: int = RATING_WINDOW, drop: float = RATING_DROP
) -> dict[str, Any]:
    """The rating rule on scores in time order: fires when the newest window fell by > `drop`."""
    if len(scores) < 2 * window:
        return {"fired": False, "reason": f"fewer than {2 * window} ratings", "last": None, "previous": None}  # fmt: skip
    last = float(np.mean(scores[-window:]))
    previous = float(np.mean(scores[-2 * window : -window]))
    fired = last < previous - drop
    reason = f"mean score {last:.3f} over the last {window} vs {previous:.3f} before"
    return {"fired": fired, "reason": reason, "last": last, "previous": previous}


def error_alert(
    buckets: Sequence[dict[str, Any]], limit: float = ERROR_RATE_LIMIT
) -> dict[str, Any]:
    busy = [b for b in buckets if b["requests"]]
    if not busy:
        return {"fired": False, "reason": "no requests"}
    b = busy[-1]
    rate = b["errors"] / b["requests"]
    return {"fired": rate > limit, "reason": f"{b['errors']}/{b['requests']} failed ({rate:.1%})"}


def summarize(
    responses: Sequence[dict[str, Any]], feedback: Sequence[dict[str, Any]], buckets: int = 24
) -> dict[str, Any]:
    """Everything `feedback stats` prints and the dashboard draws (drift aside)."""
    times = [r["created"] for r in responses] + [f["created"] for f in feedback]
    edges = bucket_edges(min(times, default=0.0), max(times, default=0.0), buckets)
    ok = [r["latency_s"] for r in responses if r["status"] < 400]
    errors = sum(r["status"] >= 400 for r in responses)
    series = traffic(responses, edges)
    scores = [f["score"] for f in sorted(feedback, key=lambda f: (f["created"], f["id"]))]
    return {
        "requests": len(responses),
        "errors": errors,
        "error_rate": errors / len(responses) if responses else 0.0,
        "latency_p50_s": percentile(ok, 50),
        "latency_p95_s": percentile(ok, 95),
        "feedback": len(feedback),
        "corrections": sum(bool(f["correction"]) for f in feedback),
        "mean_score": float(np.mean(scores)) if scores else math.nan,
        "traffic": series,
        "ratings": rating_series(feedback, edges),
        "top_tags": top_tags(feedback),
        "alerts": {"rating": rating_alert(scores), "errors": error_alert(series)},
        "alert_rule": ALERT_RULE,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few aligned lines for the terminal."""
    s = summary
    lines = [
        f"requests     {s['requests']}  errors {s['errors']} ({s['error_rate']:.1%})",
        f"latency      p50 {s['latency_p50_s']:.3f}s  p95 {s['latency_p95_s']:.3f}s",
        f"feedback     {s['feedback']}  corrections {s['corrections']}  mean score {s['mean_score']:.3f}",
    ]
    for name, points in s["ratings"].items():
        n = sum(p["ratings"] for p in points)
        mean = sum(p["mean_score"] * p["ratings"] for p in points) / n
        lines.append(f"rating       {name}: {mean:.3f} over {n}")
    if s["top_tags"]:
        lines.append("top tags     " + ", ".join(f"{t} ({n})" for t, n in s["top_tags"]))
    for name, alert in s["alerts"].items():
        lines.append(f"alert {name:<7}{'FIRED' if alert['fired'] else 'ok'}: {alert['reason']}")
    if "drift" in s:
        d = s["drift"]
        lines.append(
            f"alert drift  {'FIRED' if d['alert']['fired'] else 'ok'}: {d['alert']['reason']}"
        )
    lines.append(f"rule         {s['alert_rule']}")
    return "\n".join(lines)
