"""Learning-rate schedules (megatron-core's OptimizerParamScheduler as configured by us)."""

from __future__ import annotations

import math

import pytest
import torch

from deltatron.train.config import OptimConfig
from deltatron.train.optim import build_scheduler


class _Opt:
    """The part of megatron-core's optimizer the scheduler touches."""

    def __init__(self):
        self.param_groups = [{"lr": 0.0, "weight_decay": 0.0}]


def _lrs(cfg: OptimConfig, steps: int) -> list[float]:
    opt = _Opt()
    sched = build_scheduler(opt, cfg, steps)
    out = []
    for _ in range(steps):  # the rate each step's update uses, then the trainer steps the schedule
        out.append(opt.param_groups[0]["lr"])
        sched.step(1)
    return out


def test_cosine_warms_up_linearly_then_decays_to_min_lr():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    lrs = _lrs(cfg, 100)
    assert lrs[4] == pytest.approx(0.5)  # step 5 of 10 warmup steps
    assert lrs[9] == pytest.approx(1.0)
    # cosine from lr to min_lr over the steps after warmup
    mid = 55
    expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (mid - 10) / 90))
    assert lrs[mid - 1] == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(0.1)


def test_wsd_holds_lr_then_decays_over_the_last_fraction():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=10, schedule="wsd", wsd_decay_fraction=0.2)
    lrs = _lrs(cfg, 100)
    assert all(lr == pytest.approx(1.0) for lr in lrs[10:80])
    assert lrs[89] == pytest.approx(0.5, abs=0.02)  # halfway through the linear decay
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)


def test_bad_optim_config_fails_clearly():
    with pytest.raises(ValueError, match="min_lr"):
        OptimConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="step")
