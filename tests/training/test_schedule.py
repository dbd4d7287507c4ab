"""`mambakit.training.schedule.lr_at`: warmup, cosine, floor, and the same values as the trainers' former copies."""
from __future__ import annotations

import math

import pytest

from mambakit.training.schedule import lr_at


def test_values_at_given_steps() -> None:
    lr, steps, warmup = 1e-3, 1000, 100
    assert lr_at(0, steps, lr, warmup) == pytest.approx(1e-5)  # first warmup step: lr / warmup
    assert lr_at(49, steps, lr, warmup) == pytest.approx(5e-4)
    assert lr_at(99, steps, lr, warmup) == pytest.approx(1e-3)  # last warmup step: the peak
    assert lr_at(100, steps, lr, warmup) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(550, steps, lr, warmup) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way down
    assert lr_at(1000, steps, lr, warmup) == pytest.approx(1e-4)  # the floor lr * min_ratio
    assert lr_at(5000, steps, lr, warmup) == pytest.approx(1e-4)  # held beyond the end


def test_floor_ratio_and_no_warmup() -> None:
    assert lr_at(0, 10, 2.0, 0) == 2.0  # no warmup: the peak at step 0
    assert lr_at(10, 10, 2.0, 0, min_ratio=0.0) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(10, 10, 2.0, 0, min_ratio=1.0) == 2.0  # a constant schedule
    assert lr_at(5, 10, 2.0, 0, min_ratio=0.5) == pytest.approx(2.0 * (0.5 + 0.5 * 0.5))


def test_monotone_after_warmup_and_warmup_longer_than_run() -> None:
    lrs = [lr_at(s, 300, 3e-3, 30) for s in range(300)]
    assert all(a <= b for a, b in zip(lrs[:30], lrs[1:31]))
    assert all(a >= b for a, b in zip(lrs[30:], lrs[31:]))
    # warmup >= steps: a linear ramp for the whole run, never above the peak
    assert [lr_at(s, 4, 1.0, 8) for s in range(4)] == [0.125, 0.25, 0.375, 0.5]


def test_matches_the_former_lm_formula() -> None:
    """The LM trainer wrote min_lr + c·(lr - min_lr); the shared lr·(r + (1 - r)·c) is the same up to rounding."""
    lr, steps, warmup, r = 3e-3, 600, 60, 0.1
    for step in range(warmup, steps + 1):
        c = 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (steps - warmup))))
        old = lr * r + c * (lr - lr * r)
        assert lr_at(step, steps, lr, warmup, r) == pytest.approx(old, rel=1e-14, abs=0)
