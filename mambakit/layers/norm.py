"""RMSNorm and the gated RMSNorm of Mamba-2.

CUDA inputs (float32 / float16 / bfloat16) go to the fused Triton kernels of `mambakit.ops.triton.norm` when Triton
is importable; everything else (CPU, float64) takes the PyTorch code below, which is also the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError


def _norm_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _triton_norm():
    """The Triton norm module when Triton is importable, else None."""
    try:
        from mambakit.ops.triton import norm
    except ImportError:
        return None
    return norm


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _use_triton(x: Tensor, weight: Tensor, z: Optional[Tensor] = None) -> bool:
    """Whether x, z (..., d) and weight (d,) go to the Triton kernels: all on one CUDA device, x and z not float64,
    Triton importable."""
    return (x.is_cuda and x.dtype in _TRITON_DTYPES and weight.device == x.device
            and (z is None or (z.dtype in _TRITON_DTYPES and z.device == x.device)) and _triton_norm() is not None)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x: (..., d) normalised in float32 (float64 for float64 x) by its root mean square over d, scaled by weight (d,);
    returns x's dtype."""
    if _use_triton(x, weight):
        return _triton_norm().rms_norm_triton(x, weight, eps)
    fp = _norm_dtype(x)
    xf = x.to(fp)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(fp)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class RMSNormGated(nn.Module):
    """norm(y * silu(z)) (norm_before_gate=False, the Mamba-2 default) or norm(y) * silu(z), normalised per group of
    `group_size` channels (d_inner / ngroups), as mamba_ssm and transformers 5.x do."""

    def __init__(self, d: int, eps: float = 1e-5, group_size: Optional[int] = None, norm_before_gate: bool = False,
                 device=None, dtype=None):
        super().__init__()
        group_size = group_size or d
        if d % group_size != 0:
            raise MambaKitError(f"RMSNormGated group_size must divide d={d}, got {group_size}")
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, y: Tensor, z: Optional[Tensor] = None) -> Tensor:
        """y, z: (..., d). Returns (..., d) in y's dtype."""
        if _use_triton(y, self.weight, z):
            return _triton_norm().rms_norm_gated_triton(y, z, self.weight, self.eps, self.group_size,
                                                        self.norm_before_gate)
        dtype, fp = y.dtype, _norm_dtype(y)
        yf = y.to(fp)
        if z is not None and not self.norm_before_gate:
            yf = yf * F.silu(z.to(fp))
        groups = yf.unflatten(-1, (-1, self.group_size))
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        out = groups.flatten(-2) * self.weight.to(fp)
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.to(fp))
        return out.to(dtype)
