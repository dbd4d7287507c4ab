"""The fused Mamba-1 inner path: one autograd function over the Triton conv and selective-scan kernels.

Layout: xz is read through its (batch, 2 * d_inner, seqlen) view of the in_proj output (batch, seqlen, 2 * d_inner);
the conv output u and the scan output y are written channel-last, (batch, seqlen, d_inner) in memory, so x_proj
and out_proj read them as plain (batch * seqlen, d_inner) matrices; delta comes out of dt_proj channel-last and B, C
are read in place from x_proj's output. The backward writes the gradient of xz straight into one channel-last
buffer (the conv's dx into its x half, the scan's dz into its z half), so the in_proj backward reads it in place.
Saved for the backward: xz, x_proj's output, y and the scan's chunk states; the conv output and delta are recomputed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambakit.ops.conv1d.triton import conv1d_backward, conv1d_forward
from mambakit.ops.selective_scan.triton import pick_config, scan_backward, scan_forward


def _channels_last(batch: int, seqlen: int, dim: int, like: Tensor) -> Tensor:
    """A new (batch, dim, seqlen) tensor whose memory is (batch, seqlen, dim)."""
    return torch.empty(batch, seqlen, dim, device=like.device, dtype=like.dtype).transpose(1, 2)


def _padding_zeroed(t: Tensor, seq_idx: Optional[Tensor]) -> Tensor:
    """t (batch, d_inner, seqlen) set to 0 in place where seq_idx < 0 (padding, as the conv op defines it)."""
    return t if seq_idx is None else t.masked_fill_(seq_idx[:, None, :] < 0, 0.0)


def _rows(t: Tensor) -> Tensor:
    """(batch, dim, seqlen) channel-last view -> its (batch * seqlen, dim) matrix (no copy)."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])


def _scan_inputs(xz: Tensor, conv_w: Tensor, conv_b: Optional[Tensor], x_proj_w: Tensor, dt_proj_w: Tensor,
                 n: int, seq_idx: Optional[Tensor], x_dbl: Optional[Tensor] = None,
                 conv_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """u = silu(conv(x)) (channel-last, 0 at seq_idx < 0), x_dbl = x_proj(u) (batch * seqlen, rank + 2 n) unless
    given (the backward's recompute), delta = dt_proj(dt_low) and the B, C views of x_dbl, all (batch, ., seqlen)
    views of channel-last memory. Returns (u, x_dbl, delta, B, C)."""
    batch, two_d, seqlen = xz.shape
    d = two_d // 2
    rank = dt_proj_w.shape[1]
    u = conv1d_forward(xz[:, :d], conv_w, conv_b, True, seq_idx, out=_channels_last(batch, seqlen, d, xz),
                       conv_state=conv_state)
    u = _padding_zeroed(u, seq_idx)
    if x_dbl is None:
        x_dbl = _rows(u) @ x_proj_w.t()
    delta = (x_dbl[:, :rank] @ dt_proj_w.t()).view(batch, seqlen, d).transpose(1, 2)
    bc = x_dbl.view(batch, seqlen, -1).transpose(1, 2)  # (batch, rank + 2 n, seqlen), a view
    return u, x_dbl, delta, bc[:, None, rank:rank + n], bc[:, None, rank + n:]


def _in_dtype(dtype: torch.dtype, *weights: Optional[Tensor]) -> list[Optional[Tensor]]:
    """The weights cast to dtype (contiguous), None kept."""
    return [None if w is None else w.to(dtype).contiguous() for w in weights]


class _MambaInnerFused(torch.autograd.Function):
    """The weights come in their own dtype (float32 parameters under autocast). The projections' are cast to xz's
    here (for the products), so that their gradients leave in their dtype without a cast node of autograd's; the
    conv kernels read the conv weight and bias as they are (they compute in float32: no cast kernel, and the
    conv's float32 sums leave unrounded)."""

    @staticmethod
    def forward(ctx, xz, conv_w, conv_b, x_proj_w, dt_proj_w, out_w, out_b, A, D, delta_bias, softplus, seq_idx,
                cfg, save_states, a_is_log):
        ctx.grad_dtypes = (conv_w.dtype, x_proj_w.dtype, dt_proj_w.dtype, out_w.dtype, A.dtype)
        ctx.a_is_log = a_is_log  # A holds A_log: the scan kernels form A = -exp(A_log) and give A_log's gradient
        x_proj_w, dt_proj_w, out_w, out_b = _in_dtype(xz.dtype, x_proj_w, dt_proj_w, out_w, out_b)
        batch, two_d, seqlen = xz.shape
        d = two_d // 2
        u, x_dbl, delta, B, C = _scan_inputs(xz, conv_w, conv_b, x_proj_w, dt_proj_w, A.shape[1], seq_idx)
        y, _, states = scan_forward(u, delta, A, B, C, D, xz[:, d:], delta_bias, softplus, None, seq_idx, cfg,
                                    save_states, out=_channels_last(batch, seqlen, d, xz), a_log=a_is_log)
        out = torch.nn.functional.linear(_rows(y), out_w, out_b).view(batch, seqlen, -1)
        ctx.save_for_backward(xz, conv_w, conv_b, x_proj_w, dt_proj_w, out_w, A, D, delta_bias, seq_idx, x_dbl, y,
                              states)
        ctx.softplus, ctx.cfg, ctx.has_out_b = softplus, cfg, out_b is not None
        return out

    @staticmethod
    def backward(ctx, gout):
        xz, conv_w, conv_b, x_proj_w, dt_proj_w, out_w, A, D, delta_bias, seq_idx, x_dbl, y, states = \
            ctx.saved_tensors
        batch, two_d, seqlen = xz.shape
        d = two_d // 2
        rank, n = dt_proj_w.shape[1], A.shape[1]
        conv_dtype, x_proj_dtype, dt_proj_dtype, out_dtype, a_dtype = ctx.grad_dtypes
        g2 = gout.reshape(batch * seqlen, -1).to(y.dtype)
        d_out_w = (g2.t() @ _rows(y)).to(out_dtype)
        d_out_b = g2.sum(0, dtype=out_dtype) if ctx.has_out_b else None
        gy = (g2 @ out_w).view(batch, seqlen, d).transpose(1, 2)
        # recompute the conv output and delta
        x, z = xz[:, :d], xz[:, d:]
        u, _, delta, B, C = _scan_inputs(xz, conv_w, conv_b, x_proj_w, dt_proj_w, n, seq_idx, x_dbl=x_dbl)
        dt_low = x_dbl[:, :rank]
        dxz = _channels_last(batch, seqlen, two_d, xz)
        d_x_dbl = torch.empty_like(x_dbl)
        d_bc = d_x_dbl.view(batch, seqlen, -1).transpose(1, 2)[:, None]  # (batch, 1, rank + 2 n, seqlen), a view
        du, ddelta, _, dA, _, _, dD, dbias, _ = scan_backward(  # dB, dC straight into d_x_dbl
            u, delta, A, B, C, D, z, delta_bias, ctx.softplus, seq_idx, states, ctx.cfg, gy, None,
            dz_out=dxz[:, d:], du_out=_channels_last(batch, seqlen, d, xz), dB_out=d_bc[:, :, rank:rank + n],
            dC_out=d_bc[:, :, rank + n:], a_log=ctx.a_is_log)
        ddelta2 = _rows(ddelta)
        d_dt_proj_w = (ddelta2.t() @ dt_low).to(dt_proj_dtype)
        torch.mm(ddelta2, dt_proj_w, out=d_x_dbl[:, :rank])
        d_x_proj_w = (d_x_dbl.t() @ _rows(u)).to(x_proj_dtype)
        du_rows = _rows(du)
        du_rows.addmm_(d_x_dbl, x_proj_w)  # the conv output feeds both the scan and x_proj
        _padding_zeroed(du, seq_idx)  # the conv output is the constant 0 at padding
        _, d_conv_w, d_conv_b = conv1d_backward(x, conv_w, conv_b, True, seq_idx, du, dx_out=dxz[:, :d],
                                                grad_dtype=conv_dtype)
        dD = dD.to(D.dtype) if D is not None else None
        dbias = dbias.to(delta_bias.dtype) if delta_bias is not None else None
        dA = dA.to(a_dtype)  # A_log's gradient when A came as A_log
        return (dxz, d_conv_w, d_conv_b, d_x_proj_w, d_dt_proj_w, d_out_w, d_out_b, dA, dD, dbias, None, None, None,
                None, None)


@torch.no_grad()
def mamba_inner_fused_inference(xz: Tensor, conv1d_weight: Tensor, conv1d_bias: Optional[Tensor],
                                x_proj_weight: Tensor, delta_proj_weight: Tensor, out_proj_weight: Tensor,
                                out_proj_bias: Optional[Tensor], A: Tensor, D: Optional[Tensor],
                                delta_bias: Optional[Tensor], conv_state: Tensor, ssm_state: Tensor,
                                delta_softplus: bool = True) -> tuple[Tensor, Tensor]:
    """The fused forward continuing a recurrent state (a prefill; no autograd). conv_state: (batch, d_inner, width)
    the last inputs before xz's first step; ssm_state: (batch, d_inner, d_state). Neither is modified. Returns
    (out (batch, seqlen, d_model), the SSM state after the last step (batch, d_inner, d_state) float32)."""
    dt = xz.dtype
    batch, two_d, seqlen = xz.shape
    d = two_d // 2
    n = A.shape[1]
    cfg = pick_config(n, d, d, 1)
    u, _, delta, B, C = _scan_inputs(xz, conv1d_weight.to(dt).contiguous(),
                                     None if conv1d_bias is None else conv1d_bias.to(dt), x_proj_weight.to(dt),
                                     delta_proj_weight.to(dt), n, None, conv_state=conv_state.to(dt))
    f32 = torch.float32
    y, last, _ = scan_forward(u, delta, A.to(f32).contiguous(), B, C,
                              None if D is None else D.to(f32), xz[:, d:],
                              None if delta_bias is None else delta_bias.to(f32),
                              delta_softplus, ssm_state.to(f32).contiguous(), None, cfg, False,
                              out=_channels_last(batch, seqlen, d, xz))
    bias = None if out_proj_bias is None else out_proj_bias.to(dt)
    out = torch.nn.functional.linear(_rows(y), out_proj_weight.to(dt), bias).view(batch, seqlen, -1)
    return out, last


def mamba_inner_fused(xz: Tensor, conv1d_weight: Tensor, conv1d_bias: Optional[Tensor], x_proj_weight: Tensor,
                      delta_proj_weight: Tensor, out_proj_weight: Tensor, out_proj_bias: Optional[Tensor], A: Tensor,
                      D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = True,
                      seq_idx: Optional[Tensor] = None, a_is_log: bool = False) -> Tensor:
    """The fused form of `mambakit.ops.mamba_inner.mamba_inner` (checked arguments; CUDA tensors, or the CPU under
    TRITON_INTERPRET=1). xz: (batch, 2 * d_inner, seqlen) -> (batch, seqlen, d_model) in xz's dtype. a_is_log: A
    holds A_log (A = -exp(A_log), formed in the scan kernels; its gradient is A_log's)."""
    d = xz.shape[1] // 2
    cfg = pick_config(A.shape[1], d, d, 1)
    f32 = torch.float32
    weights = (conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias)
    if conv1d_bias is not None and conv1d_bias.dtype != conv1d_weight.dtype:  # one dtype for the conv's gradients
        weights = (conv1d_weight, conv1d_bias.to(conv1d_weight.dtype)) + weights[2:]
    if out_proj_bias is not None and out_proj_bias.dtype != out_proj_weight.dtype:
        weights = weights[:5] + (out_proj_bias.to(out_proj_weight.dtype),)
    tensors = (xz, A, D, delta_bias) + weights
    save_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    return _MambaInnerFused.apply(
        xz, *weights, A.to(f32).contiguous(), D.to(f32) if D is not None else None,
        delta_bias.to(f32) if delta_bias is not None else None, bool(delta_softplus), seq, cfg, save_states, a_is_log)
