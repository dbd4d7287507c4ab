"""RMSNorm and the gated RMSNorm of Mamba-2 as modules (their parameter is the per-channel weight).

The math and the kernel choice are the ops' (`mambakit.ops.norm`): CUDA inputs go to its fused Triton kernels,
everything else to its PyTorch code.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.ops.norm import gated_norm_input, group_rms_scale, rms_norm, rms_norm_gated
from mambakit.ops.norm import use_triton as _use_triton  # the modules' backend switch (benchmarks patch it)

__all__ = ["RMSNorm", "RMSNormGated", "rms_norm"]


def _backend(x: Tensor, weight: Tensor, z: Optional[Tensor] = None) -> str:
    return "triton" if _use_triton(x, weight, z) else "torch"


class RMSNorm(nn.Module):
    """RMSNorm over the last dim: x (..., d) -> (..., d) in x's dtype."""

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, backend=_backend(x, self.weight))


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
        return rms_norm_gated(y, z, self.weight, self.eps, self.group_size, self.norm_before_gate,
                              backend=_backend(y, self.weight, z))

    def rms_scale(self, y: Tensor, z: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The data-dependent factor of the norm: 1 / rms of each channel's group of what is normalised (y * silu(z)
        with the gate first, else y), (..., d) in ``dtype`` (default: the norm's compute dtype), so that
        ``forward(y, z) == normalised input * rms_scale(y, z) * weight`` (times silu(z) when the norm comes first)."""
        x = gated_norm_input(y, z, self.norm_before_gate)
        x = x.to(dtype or x.dtype)
        scale = group_rms_scale(x, self.eps, self.group_size)  # (..., ngroups, 1)
        return scale.expand(x.shape[:-1] + (-1, self.group_size)).flatten(-2)
