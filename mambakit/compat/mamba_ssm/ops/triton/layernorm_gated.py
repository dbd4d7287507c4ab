"""`mamba_ssm.ops.triton.layernorm_gated`: the gated, grouped norms `rmsnorm_fn` / `layernorm_fn` and their
modules `RMSNorm` / `LayerNorm`, with the official default norm_before_gate=True (mambakit's own RMSNormGated keeps
its default False, the Mamba-2 block's choice).

x, z: (..., d); weight, bias: (d,); group_size divides d (None: one group). norm_before_gate: norm(x) * silu(z),
else norm(x * silu(z)). Computed in float32 (float64 for float64 inputs), returned in x's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.ops.norm import rms_norm_gated

__all__ = ["LayerNorm", "RMSNorm", "layernorm_fn", "rms_norm_ref", "rmsnorm_fn"]


def layernorm_fn(x: Tensor, weight: Tensor, bias: Optional[Tensor], z: Optional[Tensor] = None, eps: float = 1e-6,
                 group_size: Optional[int] = None, norm_before_gate: bool = True, is_rms_norm: bool = False) -> Tensor:
    """The gated, grouped LayerNorm (or RMSNorm with is_rms_norm) of the official signature; (..., d) in x's dtype."""
    d = x.shape[-1]
    group_size = group_size or d
    if d % group_size:
        raise MambaKitError(f"group_size must divide the last dim {d}, got {group_size}")
    if z is not None and z.shape != x.shape:
        raise MambaKitError(f"z must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")
    fp = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, zf = x.to(fp), None if z is None else z.to(fp)
    if is_rms_norm:
        gate_in_norm = zf if not norm_before_gate else None
        out = rms_norm_gated(xf, gate_in_norm, weight.to(fp), eps, group_size, norm_before_gate=False)
    else:
        h = xf if zf is None or norm_before_gate else xf * F.silu(zf)
        groups = h.unflatten(-1, (-1, group_size))
        out = F.layer_norm(groups, (group_size,), eps=eps).flatten(-2) * weight.to(fp)
    if bias is not None:
        out = out + bias.to(fp)
    if zf is not None and norm_before_gate:
        out = out * F.silu(zf)
    return out.to(x.dtype)


def rmsnorm_fn(x: Tensor, weight: Tensor, bias: Optional[Tensor], z: Optional[Tensor] = None, eps: float = 1e-6,
               group_size: Optional[int] = None, norm_before_gate: bool = True) -> Tensor:
    """The gated, grouped RMSNorm (official signature; norm_before_gate defaults to True as official)."""
    return layernorm_fn(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm=True)


def rms_norm_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], z: Optional[Tensor] = None, eps: float = 1e-6,
                 group_size: Optional[int] = None, norm_before_gate: bool = True, upcast: bool = True) -> Tensor:
    """The official reference's signature: the same computation as `rmsnorm_fn` (always upcast)."""
    return rmsnorm_fn(x, weight, bias, z, eps, group_size, norm_before_gate)


class LayerNorm(nn.Module):
    """Gated, grouped LayerNorm with weight and bias: forward(x, z=None) -> (..., hidden_size)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        return layernorm_fn(x, self.weight, self.bias, z, self.eps, self.group_size, self.norm_before_gate)


class RMSNorm(nn.Module):
    """Gated, grouped RMSNorm (no bias): forward(x, z=None) -> (..., hidden_size)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        return rmsnorm_fn(x, self.weight, self.bias, z, self.eps, self.group_size, self.norm_before_gate)
