"""Triton kernels for the one-token decoding step, each replacing a run of small PyTorch kernels.

At small batches a decode step is a few hundred tiny kernels whose count, not their bytes, sets the time (also inside
a CUDA graph; the launch costs are in benchmarks/RESULTS.md). Here: `conv1d_update_triton`: shift the conv state,
insert the new column, depthwise dot, bias, SiLU (7 kernels -> 1). (The residual add + RMSNorm of a step is
`mambakit.ops.norm.add_rms_norm`, one kernel.)
Inference only (no autograd); same results as the PyTorch versions up to float32 rounding order.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.triton.device import interpreted
from mambakit.ops.triton.grid import cdiv, next_power_of_2



@triton.jit
def _conv_update_kernel(x_ptr, s_ptr, w_ptr, b_ptr, y_ptr, dim, width, s_sb, s_sd, s_sw, s_xb, s_xd,
                        HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, WP: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d1 = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.arange(0, WP)
    md = d1 < dim
    d64 = d1.to(tl.int64)
    x = tl.load(x_ptr + b * s_xb + d64 * s_xd, mask=md, other=0.0)
    row = s_ptr + b * s_sb + d64[:, None] * s_sd
    # shifted left by one: column k takes column k + 1, the last column takes x
    shifted = tl.load(row + (k[None, :] + 1) * s_sw, mask=md[:, None] & (k[None, :] + 1 < width), other=0.0)
    new = tl.where(k[None, :] == width - 1, x.to(s_ptr.dtype.element_ty)[:, None], shifted)
    tl.store(row + k[None, :] * s_sw, new, mask=md[:, None] & (k[None, :] < width))
    w = tl.load(w_ptr + d64[:, None] * width + k[None, :], mask=md[:, None] & (k[None, :] < width), other=0.0)
    # the PyTorch path computes in x's dtype: round the state and the weights to it
    xt = x_ptr.dtype.element_ty
    y = tl.sum(new.to(xt).to(tl.float32) * w.to(xt).to(tl.float32), axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + d1, mask=md, other=0.0).to(xt).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + b * dim + d1, y.to(xt), mask=md)


def conv1d_update_triton(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         activation: Optional[str] = None) -> Tensor:
    """One decoding step of the causal depthwise conv: x (batch, dim), conv_state (batch, dim, width) shifted and
    updated in place, weight (dim, width), bias (dim,). Returns y (batch, dim) in x's dtype."""
    if activation not in (None, "silu", "swish"):
        raise MambaKitError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    batch, dim = x.shape
    width = conv_state.shape[2]
    if weight.shape != (dim, width) or (bias is not None and bias.shape != (dim,)):
        raise MambaKitError(f"conv1d_update_triton: weight must be ({dim}, {width}) and bias ({dim},), got "
                            f"{tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}")
    if not x.is_cuda and not interpreted():
        raise MambaKitError(f"conv1d_update_triton needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    w = weight.contiguous()
    y = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    wp = next_power_of_2(width)
    bd = max(16, min(256, 4096 // wp))
    grid = (cdiv(dim, bd), batch)
    _conv_update_kernel[grid](x, conv_state, w, bias if bias is not None else w, y, dim, width,
                              conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), x.stride(0),
                              x.stride(1), HAS_BIAS=bias is not None, SILU=activation is not None, BLOCK_D=bd, WP=wp,
                              num_warps=4)
    return y
