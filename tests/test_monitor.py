"""EarlyStopping and OverfitMonitor on synthetic evaluation series, including resume via state.

Wiring them into the training loop is tested with the loop.
"""

from __future__ import annotations

import json
import math

import pytest

from tuneforge.train.callbacks import EarlyStopping, OverfitMonitor


def feed(stopper: EarlyStopping, values: list[float]) -> list[bool]:
    """update() answers for each value (step = 10 * index); stops feeding once should_stop."""
    answers = []
    for i, value in enumerate(values):
        answers.append(stopper.update(value, step=10 * i))
        if stopper.should_stop:
            break
    return answers


def test_early_stopping_min_mode_stops_after_patience():
    stopper = EarlyStopping(patience=2)
    answers = feed(stopper, [3.0, 2.5, 2.6, 2.4, 2.45, 2.5, 1.0])
    assert answers == [True, True, False, True, False, False]
    assert stopper.should_stop
    assert stopper.best == 2.4 and stopper.best_step == 30


def test_early_stopping_max_mode():
    stopper = EarlyStopping(patience=3, metric="eval_bleu", mode="max")
    answers = feed(stopper, [10.0, 12.0, 11.0, 12.0, 13.0, 9.0, 12.9, 13.0])
    assert answers == [True, True, False, False, True, False, False, False]
    assert stopper.should_stop and stopper.best == 13.0 and stopper.best_step == 40


def test_early_stopping_min_delta_ignores_tiny_gains():
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    answers = feed(stopper, [2.0, 1.95, 1.91, 1.7])
    # 1.95 and 1.91 are within 0.1 of 2.0: two bad evaluations, stop before 1.7 is seen.
    assert answers == [True, False, False]
    assert stopper.should_stop and stopper.best == 2.0


def test_early_stopping_nan_is_never_a_best():
    stopper = EarlyStopping(patience=1)
    assert stopper.update(1.0, step=1)
    assert not stopper.update(math.nan, step=2)
    assert stopper.should_stop and stopper.best == 1.0
    first = EarlyStopping(patience=1)
    assert not first.update(math.nan) and first.best is None


def test_early_stopping_resume_continues_the_count():
    stopper = EarlyStopping(patience=3)
    feed(stopper, [2.0, 1.5, 1.6, 1.7])
    state = json.loads(json.dumps(stopper.state_dict()))  # survives a JSON round trip
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(state)
    assert (resumed.best, resumed.best_step, resumed.num_bad_evals) == (1.5, 10, 2)
    assert not resumed.should_stop
    resumed.update(1.55, step=40)
    assert resumed.should_stop


def test_early_stopping_refuses_state_of_another_metric_or_mode():
    state = EarlyStopping(patience=2).state_dict()
    with pytest.raises(ValueError, match="early_stopping.mode: checkpoint has 'min'"):
        EarlyStopping(patience=2, mode="max").load_state_dict(state)
    with pytest.raises(ValueError, match="early_stopping.metric"):
        EarlyStopping(patience=2, metric="eval_bleu").load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"patience": 0}, "patience"), ({"patience": 1, "mode": "up"}, "mode"),
     ({"patience": 1, "min_delta": -1.0}, "min_delta")],
)  # fmt: skip
def test_early_stopping_validates_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyStopping(**kwargs)


def run_monitor(monitor: OverfitMonitor, train: list[float], evals: list[float]) -> list:
    return [
        monitor.update(100 * (i + 1), t, e)
        for i, (t, e) in enumerate(zip(train, evals, strict=True))
    ]


def test_overfit_monitor_warns_exactly_when_the_streak_reaches_patience():
    train = [2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.9]
    evals = [2.1, 1.9, 2.0, 2.1, 2.2, 2.3, 2.4]  # rises from the 3rd evaluation on
    warnings = run_monitor(OverfitMonitor(patience=3), train, evals)
    assert [w is not None for w in warnings] == [False] * 4 + [True, False, False]
    assert "step 500" in warnings[4] and "1.9000 -> 2.2000" in warnings[4]


def test_overfit_monitor_silent_when_both_fall_or_both_rise():
    falling = run_monitor(OverfitMonitor(patience=2), [2.0, 1.8, 1.6, 1.4], [2.1, 2.0, 1.9, 1.8])
    assert falling == [None] * 4
    diverging = run_monitor(OverfitMonitor(patience=2), [2.0, 2.2, 2.4, 2.6], [2.1, 2.3, 2.5, 2.7])
    assert diverging == [None] * 4


def test_overfit_monitor_streak_resets_on_an_eval_drop():
    train = [2.0, 1.8, 1.6, 1.4, 1.2, 1.0]
    evals = [2.0, 2.1, 1.9, 2.0, 2.1, 2.2]  # rise, drop, then three rises
    warnings = run_monitor(OverfitMonitor(patience=3), train, evals)
    assert [w is not None for w in warnings] == [False] * 5 + [True]


def test_overfit_monitor_records_gap_and_resumes():
    monitor = OverfitMonitor(patience=2)
    run_monitor(monitor, [2.0, 1.5], [2.5, 2.6])
    assert monitor.records[-1] == {
        "step": 200,
        "train_loss": 1.5,
        "eval_loss": 2.6,
        "gap": 2.6 - 1.5,
    }
    resumed = OverfitMonitor(patience=2)
    resumed.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    warning = resumed.update(300, 1.2, 2.8)
    assert warning is not None and "step 300" in warning
    assert len(resumed.records) == 3
