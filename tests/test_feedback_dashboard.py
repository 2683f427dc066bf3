"""The dashboard's plots on sparse data: one point gets a one-hour window, paths shorten in legends.

Renders real matplotlib figures (Agg); the page itself is tested in test_feedback_api.py.
"""

from __future__ import annotations

import datetime as dt

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tuneforge.feedback import dashboard  # noqa: E402


def test_legend_label_keeps_the_last_two_parts_of_a_path():
    assert dashboard._label("/tmp/pytest-1/ws/runs/a/adapter") == "a/adapter"
    assert dashboard._label("smollm2") == "smollm2"
    assert dashboard._label("x" * 60) == "x" * 40


def test_one_point_gets_a_one_hour_window_not_years():
    t = dt.datetime(2026, 11, 30, 12, 0)
    fig, ax = plt.subplots()
    ax.plot([t], [1.0], marker="o")
    dashboard._finish(fig, ax, [t])
    lo, hi = (matplotlib.dates.num2date(x).replace(tzinfo=None) for x in ax.get_xlim())
    assert hi - lo == dt.timedelta(hours=1)
    assert lo < t < hi
    plt.close(fig)


def test_plots_render_a_single_bucket_summary():
    start = dt.datetime(2026, 11, 30, 12, 0).timestamp()
    summary = {
        "traffic": [{"start": start, "requests": 1, "errors": 0, "p50_s": 0.4, "p95_s": 0.4}],
        "ratings": {"/abs/ws/runs/a/adapter": [{"start": start, "mean_score": 1.0}]},
    }
    out = dashboard.plots(summary)
    assert set(out) == {"Requests and errors", "Latency", "Rating per model / adapter"}
    assert all(url.startswith("data:image/png;base64,") and len(url) > 2000 for url in out.values())
