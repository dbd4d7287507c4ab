"""Mamba-2's inner path as the composition of the public ops (the reference of the fused form)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.ops.conv1d import causal_conv1d_fn
from mambakit.ops.norm import rms_norm_gated
from mambakit.ops.ssd import mamba_chunk_scan_combined


def mamba2_inner_torch(zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], dt_bias: Tensor, A: Tensor,
                       D: Optional[Tensor], norm_weight: Tensor, out_weight: Tensor, out_bias: Optional[Tensor], *,
                       headdim: int, ngroups: int, chunk_size: int, eps: float, norm_before_gate: bool,
                       dt_limit: Tuple[float, float], seq_idx: Optional[Tensor] = None,
                       ssd_backend: str = "torch") -> Tensor:
    """Same contract as `mambakit.ops.mamba2_inner.mamba2_inner`; the SSD runs on `ssd_backend`.
    zxbcdt: (batch, seqlen, d_in_proj) -> (batch, seqlen, d_model)."""
    nheads = A.shape[0]
    d_inner = nheads * headdim
    conv_dim = conv_weight.shape[0]
    d_state = (conv_dim - d_inner) // (2 * ngroups)
    z, xBC, dt = torch.split(zxbcdt, [d_inner, conv_dim, nheads], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv_weight, conv_bias, activation="silu",
                           seq_idx=seq_idx).transpose(1, 2)
    x, B, C = torch.split(xBC, [d_inner, ngroups * d_state, ngroups * d_state], dim=-1)
    y = mamba_chunk_scan_combined(
        x.unflatten(-1, (nheads, headdim)), dt, A, B.unflatten(-1, (ngroups, d_state)),
        C.unflatten(-1, (ngroups, d_state)), chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit,
        seq_idx=seq_idx, backend=ssd_backend)
    y = rms_norm_gated(y.flatten(-2), z, norm_weight, eps, d_inner // ngroups, norm_before_gate)
    bias = None if out_bias is None else out_bias.to(y.dtype)
    return F.linear(y, out_weight.to(y.dtype), bias)
