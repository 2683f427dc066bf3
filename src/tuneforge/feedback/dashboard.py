"""The `/dashboard` page: server-rendered HTML with inline PNG plots, every user string escaped.

Takes the numbers from stats.summarize and drift.drift_report; reads no database itself.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import math
from html import escape
from typing import Any

#: No script runs on the page and nothing loads from elsewhere (images are data: URLs).
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _times(points: list[dict[str, Any]]) -> list[dt.datetime]:
    return [dt.datetime.fromtimestamp(p["start"]) for p in points]


def _label(name: str) -> str:
    """A legend label: an adapter named by its path shows its last two parts, not the whole path."""
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:])[:40] if len(parts) > 1 else name[:40]


def _finish(fig, ax, times: list[dt.datetime]) -> None:
    """Date ticks; one point (or none) gets a one-hour window instead of matplotlib's years-wide one."""
    if len({t for t in times}) <= 1:
        mid = times[0] if times else dt.datetime.now()
        ax.set_xlim(mid - dt.timedelta(minutes=30), mid + dt.timedelta(minutes=30))
    fig.autofmt_xdate()


def plots(summary: dict[str, Any]) -> dict[str, str]:
    """Title -> PNG data URL for each chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    t, series = _times(summary["traffic"]), summary["traffic"]
    fig, ax = plt.subplots(figsize=(6, 2.4))
    ax.plot(t, [b["requests"] for b in series], marker=".", label="requests")
    ax.plot(t, [b["errors"] for b in series], marker=".", label="errors", color="tab:red")
    ax.legend(loc="upper left", fontsize=8)
    _finish(fig, ax, t)
    out["Requests and errors"] = _png(fig)
    fig, ax = plt.subplots(figsize=(6, 2.4))
    ax.plot(t, [b["p50_s"] for b in series], marker=".", label="p50")
    ax.plot(t, [b["p95_s"] for b in series], marker=".", label="p95")
    ax.set_ylabel("seconds")
    ax.legend(loc="upper left", fontsize=8)
    _finish(fig, ax, t)
    out["Latency"] = _png(fig)
    fig, ax = plt.subplots(figsize=(6, 2.4))
    rated: list[dt.datetime] = []
    for name, points in summary["ratings"].items():
        rated += _times(points)
        ax.plot(_times(points), [p["mean_score"] for p in points], marker="o", label=_label(name))
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("mean score (0-1)")
    if summary["ratings"]:
        ax.legend(loc="lower left", fontsize=7)
    _finish(fig, ax, rated)
    out["Rating per model / adapter"] = _png(fig)
    return out


def _alert_rows(summary: dict[str, Any], drift: dict[str, Any] | None) -> str:
    alerts = dict(summary["alerts"])
    if drift is not None:
        alerts["drift"] = drift["alert"]
    return "".join(
        f"<tr><td>{escape(name)}</td><td class={'fired' if a['fired'] else 'ok'}>"
        f"{'FIRED' if a['fired'] else 'ok'}</td><td>{escape(a['reason'])}</td></tr>"
        for name, a in alerts.items()
    )


def _drift_block(drift: dict[str, Any] | None) -> str:
    if drift is None:
        return "<p>No training data given: drift is not measured.</p>"
    med, zh = drift["length_median"], drift["zh_share"]
    return (
        "<table><tr><th></th><th>training</th><th>served</th></tr>"
        f"<tr><td>median prompt length (chars)</td><td>{med['train']:.0f}</td><td>{_num(med['served'])}</td></tr>"
        f"<tr><td>Chinese share</td><td>{zh['train']:.0%}</td><td>{zh['served']:.0%}</td></tr>"
        f"<tr><td>far from the training set</td><td></td><td>{drift['far_share']:.0%}</td></tr>"
        f"<tr><td>prompt-length PSI</td><td></td><td>{drift['length_psi']:.3f}</td></tr></table>"
        f"<p class=rule>Rule: {escape(drift['rule'])}</p>"
    )


def _num(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.3g}"


def _recent(feedback: list[dict[str, Any]], n: int = 20) -> str:
    rows = "".join(
        f"<tr><td>{f['id']}</td><td>{escape(f['response']['model'])}</td><td>{f['rating']} "
        f"({escape(f['scale'])})</td><td>{escape(', '.join(f['tags']))}</td>"
        f"<td>{escape((f['comment'] or '')[:300])}</td><td>{escape((f['correction'] or '')[:300])}</td></tr>"
        for f in reversed(feedback[-n:])
    )
    return (
        "<table><tr><th>id</th><th>model</th><th>rating</th><th>tags</th><th>comment</th>"
        f"<th>correction</th></tr>{rows}</table>"
    )


def render(
    summary: dict[str, Any], drift: dict[str, Any] | None, feedback: list[dict[str, Any]]
) -> str:
    """The whole page; every string that came from a user or a model goes through escape()."""
    s = summary
    images = "".join(
        f"<figure><figcaption>{escape(title)}</figcaption><img alt='{escape(title)}' src='{url}'></figure>"
        for title, url in plots(summary).items()
    )
    tags = "".join(f"<li>{escape(t)} ({n})</li>" for t, n in s["top_tags"]) or "<li>none</li>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tuneforge dashboard</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:70em}}td,th{{padding:2px 8px;
text-align:left;vertical-align:top}}.fired{{color:#b00;font-weight:bold}}.ok{{color:#070}}
figure{{display:inline-block;margin:0 1em 1em 0}}.rule{{color:#555;font-size:90%}}</style></head>
<body><h1>tuneforge: served model and feedback</h1>
<p>{s["requests"]} requests, {s["errors"]} errors ({s["error_rate"]:.1%}); latency p50
{_num(s["latency_p50_s"])} s, p95 {_num(s["latency_p95_s"])} s; {s["feedback"]} ratings,
{s["corrections"]} corrections, mean score {_num(s["mean_score"])}.</p>
<h2>Alerts</h2><table>{_alert_rows(s, drift)}</table>
<p class=rule>Rule: {escape(s["alert_rule"])}</p>
<h2>Over time</h2>{images}
<h2>Top tags</h2><ul>{tags}</ul>
<h2>Drift of the inputs</h2>{_drift_block(drift)}
<h2>Latest feedback</h2>{_recent(feedback)}
</body></html>"""
