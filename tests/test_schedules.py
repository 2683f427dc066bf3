"""Learning-rate schedules are pure functions of the step: checked without a model."""

import math

import pytest
import torch

from tuneforge.methods.param_groups import default_param_groups
from tuneforge.train.optim import build_scheduler, lr_factor, warmup_steps_for


def test_constant_with_warmup():
    f = [lr_factor(s, total_steps=10, warmup_steps=4, schedule="constant") for s in range(10)]
    assert f == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_linear_decays_to_zero():
    f = [lr_factor(s, total_steps=5, warmup_steps=0, schedule="linear") for s in range(6)]
    assert f == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])


def test_cosine_shape():
    total = 100
    f = [lr_factor(s, total_steps=total, warmup_steps=10, schedule="cosine") for s in range(total)]
    assert f[9] == 1.0 and f[10] == 1.0
    assert f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))


def test_unknown_schedule_names_the_key():
    with pytest.raises(ValueError, match="train.scheduler"):
        lr_factor(0, total_steps=1, warmup_steps=0, schedule="cosin")


def test_warmup_ratio_rounds_up_and_steps_win():
    assert warmup_steps_for(100, 0, 0.05) == 5
    assert warmup_steps_for(10, 0, 0.05) == 1
    assert warmup_steps_for(100, 7, 0.5) == 7


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, total_steps=4, warmup_steps=2, schedule="linear")
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5, 1.0, 1.0, 0.5])


def test_norms_and_biases_get_no_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = {g["name"]: g for g in default_param_groups(model, 1e-3, 0.1)}
    assert groups["decay"]["weight_decay"] == 0.1 and len(groups["decay"]["params"]) == 1
    assert groups["no_decay"]["weight_decay"] == 0.0 and len(groups["no_decay"]["params"]) == 3
