"""Learning-rate schedules: values at given steps, and the optimizer's rate step by step."""

from __future__ import annotations

import math

import pytest
import torch

from kbit.train.config import TrainConfig
from kbit.train.schedule import build_scheduler, lr_factor, warmup_steps


@pytest.mark.parametrize(
    ("kind", "step", "expected"),
    [
        ("cosine", 0, 0.25),  # warmup of 4: (0 + 1) / 4
        ("cosine", 3, 1.0),  # last warmup step reaches the peak
        ("cosine", 4, 1.0),  # first decay step: progress 0
        ("cosine", 9, 0.5),  # progress (9 - 4) / (14 - 4) = 0.5: half way down the cosine
        ("cosine", 13, 0.5 * (1 + math.cos(math.pi * 0.9))),
        ("linear", 1, 0.5),
        ("linear", 9, 0.5),
        ("linear", 13, 0.1),
        ("constant", 2, 0.75),
        ("constant", 13, 1.0),
    ],
)
def test_lr_factor(kind, step, expected):
    assert lr_factor(step, total_steps=14, warmup_steps=4, kind=kind) == pytest.approx(expected, abs=1e-12)


def test_no_warmup_starts_at_the_peak_and_never_reaches_zero():
    for kind in ("cosine", "linear"):
        factors = [lr_factor(s, 10, 0, kind) for s in range(10)]
        assert factors[0] == 1.0 and all(f > 0 for f in factors)
        assert factors == sorted(factors, reverse=True)


def test_warmup_from_ratio_rounds_up():
    assert warmup_steps(TrainConfig(warmup_ratio=0.1), 15) == 2
    assert warmup_steps(TrainConfig(warmup_ratio=0.1, warmup_steps=5), 15) == 5
    assert warmup_steps(TrainConfig(), 15) == 0


def test_scheduler_drives_the_optimizer():
    """Optimizer step s runs at learning_rate * lr_factor(s)."""
    config = TrainConfig(learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="linear")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=config.learning_rate)
    sched = build_scheduler(opt, config, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-3 * lr_factor(s, 6, 2, "linear") for s in range(6)])
    assert seen[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
