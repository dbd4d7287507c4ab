"""The discretisation step dt of the selective scans, processed one way for every op, layer and application.

Processing (the official kernels' order): ``dt = dt + dt_bias``; ``dt = softplus(dt)`` if asked; clamp to
``dt_limit`` unless it is the default ``(0, inf)``. Masking (padded positions): after processing, ``dt = 0`` where
the mask is 0, so a padded step neither decays the state nor adds to it (and gets no gradient).

Layouts: SSD's dt is (batch, seqlen, nheads) with a bias over the last dim; Mamba-1's delta is (batch, dim, seqlen)
with a bias over dim 1. ``channel_dim`` and ``time_dim`` say which layout a call has.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_DT_LIMIT: Tuple[float, float] = (0.0, math.inf)


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any given tensor is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def process_dt(dt: Tensor, dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
               dt_limit: Sequence[float] = DEFAULT_DT_LIMIT, dtype: Optional[torch.dtype] = None,
               channel_dim: int = -1) -> Tensor:
    """dt (..., channels, ...) in ``dtype`` (default: dt's) with the bias (channels,) added along ``channel_dim``,
    softplus if ``dt_softplus``, clamped to ``dt_limit`` unless that is the default (0, inf). Same shape as dt."""
    if dtype is not None and dt.dtype != dtype:
        dt = dt.to(dtype)
    if dt_bias is not None:
        bias = dt_bias.to(dt.dtype)
        trailing = dt.dim() - 1 - (channel_dim % dt.dim())
        dt = dt + bias.view(bias.shape + (1,) * trailing)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != DEFAULT_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def mask_dt(dt: Tensor, mask: Optional[Tensor], time_dim: int = 1) -> Tensor:
    """The one masking rule for padded positions: processed dt with 0 where ``mask`` (batch, seqlen) is 0.

    dt: (batch, ...) with its time axis at ``time_dim``; any other axes broadcast. Returns dt unchanged for no mask.
    """
    if mask is None:
        return dt
    shape = [1] * dt.dim()
    shape[0], shape[time_dim] = mask.shape
    keep = mask.bool().view(shape)
    return torch.where(keep, dt, torch.zeros((), dtype=dt.dtype, device=dt.device))
