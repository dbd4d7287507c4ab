"""The fused Mamba-2 inner path: one autograd function over the Triton conv, SSD and gated-norm kernels.

Layout: z, xBC and dt are read in place from the in_proj output zxbcdt (batch, seqlen, d_in_proj); the conv output
is written channel-last, (batch, seqlen, conv_dim) in memory, so that the SSD reads x, B and C from it as strided
views. The backward writes the gradient of zxbcdt straight into one buffer of zxbcdt's layout (the norm's dz into
its z columns, the conv's dx into its xBC columns, ddt into its dt columns), so that nothing is concatenated and the
in_proj backward reads it as it is. Saved for the backward: zxbcdt, the SSD output y (before the norm) and the
norm's rstd (what the official `mamba_split_conv1d_scan_combined` saves), per position (d_in_proj + d_inner)
elements of zxbcdt's dtype and ngroups float32; the conv output, the SSD's chunk states (with its processed dt and
cumsum) and the normed y are recomputed in the backward (the states by the forward's own kernels: the same values
bit for bit). With SAVE_STATES the states are kept instead: nheads * headdim * d_state / Q more elements per
position (Q: the kernels' chunk, 128 for 16-bit inputs; 3072 bytes per token at the 130M shape) for one state pass
less in the backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.ops.conv1d.triton import conv1d_backward, conv1d_forward
from mambakit.ops.norm.triton import gated_norm_backward, gated_norm_forward
from mambakit.ops.segments import segments
from mambakit.ops.ssd.triton import DtGrad, kernel_chunk_size, ssd_backward, ssd_forward, ssd_states
from mambakit.ops.triton.compile import precompile_once, specialisation

#: Keep the SSD's chunk states (and its processed dt and cumsum) for the backward instead of recomputing them there
#: (see the module: memory against one state pass per backward).
SAVE_STATES: bool = False


class _Dims:
    """The column ranges of zxbcdt (batch, seqlen, d_inner + conv_dim + nheads) and the head/group shapes."""

    def __init__(self, zxbcdt: Tensor, conv_dim: int, nheads: int, ngroups: int):
        self.batch, self.seqlen, _ = zxbcdt.shape
        self.nheads, self.ngroups = nheads, ngroups
        self.d_inner = zxbcdt.shape[-1] - conv_dim - nheads
        self.headdim = self.d_inner // nheads
        self.conv_dim = conv_dim
        self.d_state = (conv_dim - self.d_inner) // (2 * ngroups)

    def split(self, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(batch, seqlen, d_in_proj) -> views z (.., d_inner), xBC (.., conv_dim), dt (.., nheads)."""
        d, c = self.d_inner, self.conv_dim
        return t[..., :d], t[..., d:d + c], t[..., d + c:]

    def xbc(self, u: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(batch, seqlen, conv_dim) -> views x (.., nheads, headdim), B, C (.., ngroups, d_state)."""
        d, gn = self.d_inner, self.ngroups * self.d_state
        return (u[..., :d].unflatten(-1, (self.nheads, self.headdim)),
                u[..., d:d + gn].unflatten(-1, (self.ngroups, self.d_state)),
                u[..., d + gn:].unflatten(-1, (self.ngroups, self.d_state)))

    def rows(self, t: Tensor) -> Tensor:
        """(batch, seqlen, k) with unit column stride -> (batch * seqlen, k), a view."""
        return t.reshape(self.batch * self.seqlen, t.shape[-1])


def _conv(dims: _Dims, xBC: Tensor, conv_w: Tensor, conv_b: Optional[Tensor], seq_idx: Optional[Tensor]) -> Tensor:
    """silu(conv(xBC)) into a new (batch, seqlen, conv_dim) buffer, 0 where seq_idx < 0 (padding)."""
    out = torch.empty(dims.batch, dims.seqlen, dims.conv_dim, device=xBC.device, dtype=xBC.dtype)
    conv1d_forward(xBC.transpose(1, 2), conv_w, conv_b, True, seq_idx, out=out.transpose(1, 2))
    return _padding_zeroed(out, seq_idx)


def _padding_zeroed(t: Tensor, seq_idx: Optional[Tensor]) -> Tensor:
    """t (batch, seqlen, k) set to 0 in place where seq_idx < 0."""
    return t if seq_idx is None else t.masked_fill_(seq_idx[..., None] < 0, 0.0)


class _Mamba2InnerFused(torch.autograd.Function):
    """The conv and out weights come in their own dtype (float32 parameters under autocast). The out weight is
    cast to zxbcdt's here (for the product), so that its gradient leaves in its dtype without a cast node of
    autograd's; the conv kernels read the conv weight and bias as they are (they compute in float32: no cast
    kernel, and the conv's float32 sums leave unrounded)."""

    @staticmethod
    def forward(ctx, zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, out_b, ngroups, chunk_size, eps,
                norm_before_gate, dt_limit, seq_idx, a_is_log):  # type: ignore[override]
        ctx.grad_dtypes = (conv_w.dtype, out_w.dtype, A.dtype)
        ctx.a_is_log = a_is_log  # A holds A_log: the kernels form A = -exp(A_log) and give A_log's gradient
        io = zxbcdt.dtype
        out_w, out_b = out_w.to(io), None if out_b is None else out_b.to(io)
        dims = _Dims(zxbcdt, conv_w.shape[0], A.shape[0], ngroups)
        z, xBC, dt = dims.split(zxbcdt)
        seg = segments(seq_idx)
        group = dims.d_inner // ngroups

        def run(backward: bool):
            u = _conv(dims, xBC, conv_w, conv_b, seq_idx)
            x, B, C = dims.xbc(u)
            y, _, saved = ssd_forward(x, dt, A, B, C, D, None, seg, chunk_size, dt_bias, True, dt_limit,
                                      a_log=a_is_log)
            y2 = dims.rows(y.flatten(-2))
            normed, rstd = gated_norm_forward(y2, dims.rows(z), norm_w, eps, group, norm_before_gate)
            if backward:  # the first call: the backward's kernels too, with guessed upstream gradients
                du = torch.empty_like(u)
                _, dB_out, dC_out = dims.xbc(du)
                ssd_backward(x, A, B, C, D, saved, torch.empty_like(y), None, chunk_size,
                             dt_grad=DtGrad(dt, dt_bias, True, dt_limit, dims.split(torch.empty_like(zxbcdt))[2]),
                             dx_out=dims.xbc(du)[0], dB_out=dB_out, dC_out=dC_out, need_dinit=False,
                             a_log=a_is_log)
                gated_norm_backward(y2, dims.rows(z), norm_w, rstd, torch.empty_like(normed), group,
                                    norm_before_gate)
            return y2, normed, rstd, saved

        key = ("mamba2_inner", zxbcdt.dtype, zxbcdt.shape[-1], dims.nheads, ngroups, chunk_size, seg is None,
               D is None or D.dim(), norm_before_gate, dt_limit is None, a_is_log, zxbcdt.device,
               specialisation(dims.batch, dims.seqlen, zxbcdt))
        precompile_once(key, lambda: run(True))
        y2, normed, rstd, saved = run(False)
        out = F.linear(normed, out_w, out_b).view(dims.batch, dims.seqlen, -1)
        ctx.save_states = SAVE_STATES
        ctx.save_for_backward(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, y2, rstd, seq_idx,
                              *(saved if SAVE_STATES else ()))
        ctx.args = (ngroups, chunk_size, eps, norm_before_gate, dt_limit)
        ctx.has_out_b = out_b is not None
        return out

    @staticmethod
    def backward(ctx, gout):  # type: ignore[override]
        zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, y2, rstd, seq_idx, *saved = ctx.saved_tensors
        ngroups, chunk_size, eps, norm_before_gate, dt_limit = ctx.args
        dims = _Dims(zxbcdt, conv_w.shape[0], A.shape[0], ngroups)
        z, xBC, dt = dims.split(zxbcdt)
        group = dims.d_inner // ngroups
        conv_dtype, out_dtype, a_dtype = ctx.grad_dtypes
        g2 = gout.reshape(dims.batch * dims.seqlen, -1).to(y2.dtype)
        normed, _ = gated_norm_forward(y2, dims.rows(z), norm_w, eps, group, norm_before_gate)  # recomputed
        d_out_w = (g2.t() @ normed).to(out_dtype)
        d_out_b = g2.sum(0, dtype=out_dtype) if ctx.has_out_b else None
        del normed
        d_normed = g2 @ out_w.to(g2.dtype)
        dzxbcdt = torch.empty_like(zxbcdt)
        dz, dxBC, ddt_out = dims.split(dzxbcdt)
        dy2, _, d_norm_w = gated_norm_backward(y2, dims.rows(z), norm_w, rstd, d_normed, group, norm_before_gate,
                                               dz_out=dims.rows(dz))
        del d_normed
        u = _conv(dims, xBC, conv_w, conv_b, seq_idx)  # recomputed
        x, B, C = dims.xbc(u)
        if not ctx.save_states:  # recomputed by the forward's kernels
            saved = ssd_states(x, dt, A, B, None, segments(seq_idx), chunk_size, dt_bias, True, dt_limit,
                               a_log=ctx.a_is_log)
        du = torch.empty_like(u)
        dx_view, dB_view, dC_view = dims.xbc(du)
        dy = dy2.view(dims.batch, dims.seqlen, dims.nheads, dims.headdim)
        _, _, dA, _, _, dD, _, d_dt_bias = ssd_backward(  # dx, dB, dC straight into du, the raw dt's into dzxbcdt
            x, A, B, C, D, tuple(saved), dy, None, chunk_size, dx_out=dx_view, dB_out=dB_view, dC_out=dC_view,
            dt_grad=DtGrad(dt, dt_bias, True, dt_limit, ddt_out), need_dinit=False, a_log=ctx.a_is_log)
        del u, x, B, C, dy, dy2, saved
        _padding_zeroed(du, seq_idx)  # the conv output is the constant 0 at padding
        _, d_conv_w, d_conv_b = conv1d_backward(xBC.transpose(1, 2), conv_w, conv_b, True, seq_idx,
                                                du.transpose(1, 2), dx_out=dxBC.transpose(1, 2),
                                                grad_dtype=conv_dtype)
        dD = dD.to(D.dtype) if D is not None else None
        dA = dA.to(a_dtype)  # A_log's gradient when A came as A_log
        return (dzxbcdt, d_conv_w, d_conv_b, d_dt_bias, dA, dD, d_norm_w, d_out_w, d_out_b, None, None, None, None,
                None, None, None)


def mamba2_inner_fused(zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], dt_bias: Tensor,
                       A: Tensor, D: Optional[Tensor], norm_weight: Tensor, out_weight: Tensor,
                       out_bias: Optional[Tensor], *, ngroups: int, chunk_size: int, eps: float,
                       norm_before_gate: bool, dt_limit: Optional[Tuple[float, float]],
                       seq_idx: Optional[Tensor], a_is_log: bool = False) -> Tensor:
    """The fused form of `mambakit.ops.mamba2_inner.mamba2_inner` (checked arguments; CUDA tensors, or the CPU
    under TRITON_INTERPRET=1). zxbcdt: (batch, seqlen, d_in_proj) with unit column stride -> (batch, seqlen,
    d_model) in zxbcdt's dtype. dt_limit None: no clamp. a_is_log: A holds A_log (A = -exp(A_log), formed in the
    SSD kernels; its gradient is A_log's)."""
    f32 = torch.float32
    # one dtype for each layer's gradients (the bias's as its weight's)
    conv_b = None if conv_bias is None else conv_bias.to(conv_weight.dtype)
    out_b = None if out_bias is None else out_bias.to(out_weight.dtype)
    return _Mamba2InnerFused.apply(
        zxbcdt, conv_weight, conv_b, dt_bias.to(f32), A.to(f32).contiguous(),
        None if D is None else D.to(f32).contiguous(), norm_weight, out_weight, out_b, ngroups,
        kernel_chunk_size(zxbcdt.shape[1], chunk_size), eps, norm_before_gate, dt_limit, seq_idx, a_is_log)
