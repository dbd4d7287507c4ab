"""The learning-rate schedule of every trainer: linear warmup, then cosine decay to a floor."""
from __future__ import annotations

import math


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Learning rate of (0-based) `step` of `steps`: linear warmup from lr/warmup to lr over the first `warmup` steps,
    then cosine decay from lr to lr·min_ratio at step `steps` (held there beyond it)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
