"""RMSNorm and the gated, grouped RMSNorm of Mamba-2 in PyTorch: the reference and the path off CUDA.

Computed in float32 (float64 for float64 inputs), returned in the input's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def norm_dtype(x: Tensor) -> torch.dtype:
    """The compute dtype of the norms: float64 for float64 x, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def group_rms_scale(x: Tensor, eps: float, group_size: int) -> Tensor:
    """1 / sqrt(mean(x^2 over each group of group_size channels) + eps): x (..., d) -> (..., d / group_size, 1), in
    x's dtype (the caller picks the compute dtype)."""
    groups = x.unflatten(-1, (-1, group_size))
    return torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm_torch(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x: (..., d) normalised by its root mean square over d, scaled by weight (d,); returns x's dtype."""
    fp = norm_dtype(x)
    xf = x.to(fp)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(fp)).to(x.dtype)


def gated_norm_input(y: Tensor, z: Optional[Tensor], norm_before_gate: bool) -> Tensor:
    """What the gated norm normalises, in the compute dtype: y * silu(z) (gate first), or y."""
    yf = y.to(norm_dtype(y))
    if z is not None and not norm_before_gate:
        yf = yf * F.silu(z.to(yf.dtype))
    return yf


def rms_norm_gated_torch(y: Tensor, z: Optional[Tensor], weight: Tensor, eps: float, group_size: int,
                         norm_before_gate: bool = False) -> Tensor:
    """norm(y * silu(z)) * weight (norm_before_gate=False) or norm(y) * weight * silu(z), per group of group_size
    channels. y, z: (..., d); weight: (d,). Returns (..., d) in y's dtype."""
    yf = gated_norm_input(y, z, norm_before_gate)
    fp = yf.dtype
    groups = yf.unflatten(-1, (-1, group_size))
    groups = groups * group_rms_scale(yf, eps, group_size)
    out = groups.flatten(-2) * weight.to(fp)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(fp))
    return out.to(y.dtype)
