"""Mamba-1's inner path as the composition of the public ops (the reference of the fused form)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.ops.conv1d import causal_conv1d_fn
from mambakit.ops.selective_scan import selective_scan_fn


def mamba_inner_torch(xz: Tensor, conv1d_weight: Tensor, conv1d_bias: Optional[Tensor], x_proj_weight: Tensor,
                      delta_proj_weight: Tensor, out_proj_weight: Tensor, out_proj_bias: Optional[Tensor], A: Tensor,
                      D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = True,
                      seq_idx: Optional[Tensor] = None, scan_backend: str = "torch") -> Tensor:
    """Same contract as `mambakit.ops.mamba_inner.mamba_inner` (conv1d_weight (d_inner, width)); the scan runs on
    `scan_backend`. xz: (batch, 2 * d_inner, seqlen) -> (batch, seqlen, d_model)."""
    d_inner = xz.shape[1] // 2
    x, z = xz[:, :d_inner], xz[:, d_inner:]
    u = causal_conv1d_fn(x, conv1d_weight, conv1d_bias, activation="silu", seq_idx=seq_idx)
    x_dbl = F.linear(u.transpose(1, 2), x_proj_weight.to(u.dtype))  # (batch, seqlen, dt_rank + 2 * d_state)
    rank, n = delta_proj_weight.shape[1], A.shape[1]
    dt, B, C = torch.split(x_dbl, [rank, n, n], dim=-1)
    delta = F.linear(dt, delta_proj_weight.to(dt.dtype)).transpose(1, 2)
    y = selective_scan_fn(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, z=z, delta_bias=delta_bias,
                          delta_softplus=delta_softplus, seq_idx=seq_idx, backend=scan_backend)
    bias = out_proj_bias.to(y.dtype) if out_proj_bias is not None else None
    return F.linear(y.transpose(1, 2), out_proj_weight.to(y.dtype), bias)
