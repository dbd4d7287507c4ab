"""AdamW and its parameter groups: weight decay on weight matrices only."""
from __future__ import annotations

from typing import Any, Iterable, Sequence, Union

import torch
from torch import nn

#: Parameter-name endings never decayed in the LM: the SSM's A_log and D (also marked `_no_weight_decay`).
NO_DECAY_SUFFIXES: tuple[str, ...] = ("A_log", ".D")

Params = Union[Iterable[nn.Parameter], Iterable[dict[str, Any]]]


def param_groups(model: nn.Module, weight_decay: float,
                 no_decay_suffixes: Sequence[str] = NO_DECAY_SUFFIXES) -> list[dict[str, Any]]:
    """Two AdamW groups over the trainable parameters of `model`, in `named_parameters` order: [decayed, not].

    Not decayed: parameters of fewer than 2 dimensions (biases, norm scales, dt biases), those marked
    ``_no_weight_decay = True`` (the mamba_ssm convention for A_log and D), and those whose name ends with one of
    `no_decay_suffixes`.
    """
    suffixes = tuple(no_decay_suffixes)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() < 2 or getattr(p, "_no_weight_decay", False) or name.endswith(suffixes)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(params: Params, lr: float, betas: tuple[float, float], eps: float = 1e-8,
          weight_decay: float = 0.0) -> torch.optim.AdamW:
    """`torch.optim.AdamW` over `params` (tensors, or groups such as `param_groups`' whose own weight_decay wins).

    The betas are an argument, not a default: each application keeps its own (LM and tasks (0.9, 0.95), Mamba-ND
    (0.9, 0.98), ReMamba torch's (0.9, 0.999)).
    """
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
