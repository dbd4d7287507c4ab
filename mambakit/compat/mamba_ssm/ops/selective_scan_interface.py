"""`mamba_ssm.ops.selective_scan_interface`: `selective_scan_fn`, `selective_scan_ref`, `mamba_inner_fn`,
`mamba_inner_ref`, with the official argument lists, on `mambakit.ops`.

Layouts (official): u, delta, z (batch, dim, seqlen); A (dim, d_state), real or complex; B, C (batch, d_state,
seqlen), grouped (batch, groups, d_state, seqlen) or time-invariant (dim, d_state), each in any combination (as
the official reference reads them; mambakit's scan takes them all); with complex A the varying B, C
are real (batch, [groups,] d_state, 2 * seqlen), (re, im) pairs along time (complex tensors of seqlen are taken
too), the time-invariant ones complex, y_t = 2 * Re(<C_t, h_t>) + D * u_t; D, delta_bias (dim,); last state
(batch, dim, d_state), complex for complex A. `mamba_inner_fn` is `mambakit.ops.mamba_inner` (on CUDA the fused
Triton form, as the official
fused kernel: little saved, the conv output and delta recomputed in the backward) when B and C come from x_proj
without extra biases or norms, else the composition conv -> x_proj -> dt_proj -> scan -> out_proj by autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.conv1d import causal_conv1d_fn
from mambakit.ops.mamba_inner import mamba_inner
from mambakit.ops.norm import rms_norm
from mambakit.ops.selective_scan import selective_scan_fn as scan
from mambakit.ops.selective_scan import selective_scan_ref as scan_ref

__all__ = ["mamba_inner_fn", "mamba_inner_ref", "selective_scan_fn", "selective_scan_ref"]


def selective_scan_fn(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                      z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                      return_last_state: bool = False):
    """The selective scan (official signature): y (batch, dim, seqlen) in u's dtype, or (y, last_state) with
    last_state (batch, dim, d_state). As official, no gradient flows from last_state."""
    out = scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if return_last_state:
        return out[0], out[1].detach()
    return out


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                       z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                       return_last_state: bool = False):
    """The sequential reference (official signature), float32 (float64 for float64 inputs); differentiable."""
    return scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def bc_from_proj(t: Tensor, A: Tensor) -> Tensor:
    """B or C from x_proj's output (batch, seqlen, features) to (batch, d_state, seqlen); for complex A the
    features are (re, im) pairs, (batch, seqlen, 2 * d_state) -> complex (batch, d_state, seqlen)."""
    if A.is_complex():
        t = torch.view_as_complex(t.float().unflatten(-1, (-1, 2)).contiguous())
    return t.transpose(1, 2)


def _inner(xz: Tensor, conv1d_weight: Tensor, conv1d_bias: Optional[Tensor], x_proj_weight: Tensor,
           delta_proj_weight: Tensor, out_proj_weight: Tensor, out_proj_bias: Optional[Tensor], A: Tensor,
           B: Optional[Tensor], C: Optional[Tensor], D: Optional[Tensor], delta_bias: Optional[Tensor],
           B_proj_bias: Optional[Tensor], C_proj_bias: Optional[Tensor], delta_softplus: bool,
           rms_weights: tuple, eps: float, scan_fn) -> Tensor:
    """The Mamba-1 inner path, xz (batch, 2 * dim, seqlen) -> (batch, seqlen, d_model)."""
    if xz.dim() != 3 or xz.shape[1] % 2:
        raise MambaKitError(f"xz must have shape (batch, 2 * dim, seqlen), got {tuple(xz.shape)}")
    x, z = xz.chunk(2, dim=1)  # (batch, dim, seqlen) each
    weight = conv1d_weight.squeeze(1) if conv1d_weight.dim() == 3 else conv1d_weight  # (dim, 1, w) -> (dim, w)
    x = causal_conv1d_fn(x, weight, conv1d_bias, activation="silu")
    rank = delta_proj_weight.shape[1]
    d_state = A.shape[-1] * (2 if A.is_complex() else 1)  # complex A: x_proj gives (re, im) pairs per state
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (batch, seqlen, rank + 2 * d_state)
    b_rms, c_rms, dt_rms = rms_weights
    delta = F.linear(x_dbl[..., :rank], delta_proj_weight)  # (batch, seqlen, dim)
    if dt_rms is not None:
        delta = rms_norm(delta, dt_rms, eps)
    if B is None:
        B = x_dbl[..., rank:rank + d_state]
        if B_proj_bias is not None:
            B = B + B_proj_bias.to(B.dtype)
        B = bc_from_proj(B if b_rms is None else rms_norm(B, b_rms, eps), A)  # (batch, d_state, seqlen)
    if C is None:
        C = x_dbl[..., -d_state:]
        if C_proj_bias is not None:
            C = C + C_proj_bias.to(C.dtype)
        C = bc_from_proj(C if c_rms is None else rms_norm(C, c_rms, eps), A)
    y = scan_fn(x, delta.transpose(1, 2), A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def mamba_inner_fn(xz: Tensor, conv1d_weight: Tensor, conv1d_bias: Optional[Tensor], x_proj_weight: Tensor,
                   delta_proj_weight: Tensor, out_proj_weight: Tensor, out_proj_bias: Optional[Tensor], A: Tensor,
                   B: Optional[Tensor] = None, C: Optional[Tensor] = None, D: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None, B_proj_bias: Optional[Tensor] = None,
                   C_proj_bias: Optional[Tensor] = None, delta_softplus: bool = True, checkpoint_lvl: int = 1,
                   b_rms_weight: Optional[Tensor] = None, c_rms_weight: Optional[Tensor] = None,
                   dt_rms_weight: Optional[Tensor] = None, b_c_dt_rms_eps: float = 1e-6) -> Tensor:
    """Mamba-1's inner path with the official argument list: xz (batch, 2 * dim, seqlen) -> (batch, seqlen,
    d_model). B, C None: taken from x_proj's output (plus B_proj_bias / C_proj_bias, RMS-normed by b_rms_weight /
    c_rms_weight when given); dt_rms_weight RMS-norms delta over dim. checkpoint_lvl (0 or 1) is accepted; autograd
    keeps what it needs."""
    if checkpoint_lvl not in (0, 1):
        raise MambaKitError(f"checkpoint_lvl must be 0 or 1, got {checkpoint_lvl!r}")
    extras = (B, C, B_proj_bias, C_proj_bias, b_rms_weight, c_rms_weight, dt_rms_weight)
    if all(t is None for t in extras) and not A.is_complex():
        return mamba_inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                           out_proj_bias, A, D, delta_bias, delta_softplus)
    return _inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias,
                  A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus,
                  (b_rms_weight, c_rms_weight, dt_rms_weight), b_c_dt_rms_eps, selective_scan_fn)


def mamba_inner_ref(xz: Tensor, conv1d_weight: Tensor, conv1d_bias: Optional[Tensor], x_proj_weight: Tensor,
                    delta_proj_weight: Tensor, out_proj_weight: Tensor, out_proj_bias: Optional[Tensor], A: Tensor,
                    B: Optional[Tensor] = None, C: Optional[Tensor] = None, D: Optional[Tensor] = None,
                    delta_bias: Optional[Tensor] = None, B_proj_bias: Optional[Tensor] = None,
                    C_proj_bias: Optional[Tensor] = None, delta_softplus: bool = True) -> Tensor:
    """The official reference's definition: the unfused composition of the public ops (causal_conv1d_fn, the
    projections, selective_scan_fn, out_proj), as the official's is; mamba_inner_fn's fused path is checked against
    it, and both against float64 in mambakit's own tests."""
    return _inner(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias,
                  A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus, (None, None, None), 1e-6,
                  selective_scan_fn)
