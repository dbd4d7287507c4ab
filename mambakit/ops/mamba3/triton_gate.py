"""The SSD form's last step as one Triton kernel each way (standard Triton only): the own-position skip and the gate,

    out = ((y + diag v) * silu(z)).to(out dtype)      per (batch, position, head) row of headdim entries,

which the PyTorch composition makes in five passes over (batch, seqlen, nheads, headdim) float32 tensors forward
and eight backward; optionally with diag = qk * corr + D[head] formed in the kernel (the SSD form's own-position
correction and skip). Backward, with g the gradient of out, s = silu(z), a = y + diag v: dy = g s, dv = g s diag,
ddiag = sum over headdim of g s v (within the row's program: deterministic), dz = g a s'(z); then dqk = ddiag corr,
dcorr = ddiag qk, dD the sum of ddiag over batch and positions (by the caller).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.ops.triton.grid import cdiv, next_power_of_2

#: (batch, position, head) rows per program
BLOCK_ROWS = 16


@triton.jit
def _row_offsets(r, L, H, s_b, s_l, s_h):
    """Offsets of rows r = (b * L + l) * H + h in a tensor with strides (s_b, s_l, s_h) over (batch, seqlen, nheads)."""
    h = r % H
    bl = r // H
    return (bl // L) * s_b + (bl % L) * s_l + h * s_h


@triton.jit
def _diag(d_ptr, c_ptr, D_ptr, r, mr, H, HAS_CORR: tl.constexpr, HAS_D: tl.constexpr):
    """The rows' diag: d, or d * corr (+ D[head]) with HAS_CORR."""
    d = tl.load(d_ptr + r, mask=mr, other=0.0)
    if HAS_CORR:
        d = d * tl.load(c_ptr + r, mask=mr, other=0.0)
        if HAS_D:
            d += tl.load(D_ptr + r % H, mask=mr, other=0.0).to(d.dtype)
    return d


@triton.jit
def _skip_gate_fwd(y_ptr, v_ptr, d_ptr, c_ptr, D_ptr, z_ptr, out_ptr, rows, L, H, P, s_zb, s_zl, s_zh,
                   HAS_Z: tl.constexpr, HAS_CORR: tl.constexpr, HAS_D: tl.constexpr, BR: tl.constexpr,
                   BP: tl.constexpr):
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    p = tl.arange(0, BP)
    m = (r < rows)[:, None] & (p < P)[None, :]
    off = r[:, None] * P + p[None, :]
    a = tl.load(y_ptr + off, mask=m, other=0.0) \
        + _diag(d_ptr, c_ptr, D_ptr, r, r < rows, H, HAS_CORR, HAS_D)[:, None] * tl.load(v_ptr + off, mask=m,
                                                                                          other=0.0)
    if HAS_Z:
        z = tl.load(z_ptr + _row_offsets(r, L, H, s_zb, s_zl, s_zh)[:, None] + p[None, :], mask=m,
                    other=0.0).to(tl.float32)
        a = a * (z * tl.sigmoid(z))
    tl.store(out_ptr + off, a.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _skip_gate_bwd(y_ptr, v_ptr, d_ptr, c_ptr, D_ptr, z_ptr, g_ptr, dy_ptr, dv_ptr, dd_ptr, dqk_ptr, dc_ptr, dz_ptr,
                   rows, L, H, P, s_zb, s_zl, s_zh, s_gb, s_gl, s_gh,
                   HAS_Z: tl.constexpr, HAS_CORR: tl.constexpr, HAS_D: tl.constexpr, BR: tl.constexpr,
                   BP: tl.constexpr):
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    p = tl.arange(0, BP)
    mr = r < rows
    m = mr[:, None] & (p < P)[None, :]
    off = r[:, None] * P + p[None, :]
    g = tl.load(g_ptr + _row_offsets(r, L, H, s_gb, s_gl, s_gh)[:, None] + p[None, :], mask=m,
                other=0.0).to(tl.float32)
    v = tl.load(v_ptr + off, mask=m, other=0.0)
    d = _diag(d_ptr, c_ptr, D_ptr, r, mr, H, HAS_CORR, HAS_D)
    if HAS_Z:
        z_off = _row_offsets(r, L, H, s_zb, s_zl, s_zh)[:, None] + p[None, :]
        z = tl.load(z_ptr + z_off, mask=m, other=0.0).to(tl.float32)
        sg = tl.sigmoid(z)
        a = tl.load(y_ptr + off, mask=m, other=0.0) + d[:, None] * v
        tl.store(dz_ptr + off, (g * a * sg * (1.0 + z * (1.0 - sg))).to(dz_ptr.dtype.element_ty), mask=m)
        g = g * (z * sg)
    tl.store(dy_ptr + off, g, mask=m)
    tl.store(dv_ptr + off, g * d[:, None], mask=m)
    dd = tl.sum(g * v, axis=1)
    tl.store(dd_ptr + r, dd, mask=mr)
    if HAS_CORR:
        tl.store(dqk_ptr + r, dd * tl.load(c_ptr + r, mask=mr, other=0.0), mask=mr)
        tl.store(dc_ptr + r, dd * tl.load(d_ptr + r, mask=mr, other=0.0), mask=mr)


class _SkipGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, v, diag, z, out_dtype, corr, D):  # type: ignore[override]
        batch, L, H, P = y.shape
        rows = batch * L * H
        out = torch.empty(y.shape, device=y.device, dtype=out_dtype)
        zz = z if z is not None else y
        meta = dict(HAS_Z=z is not None, HAS_CORR=corr is not None, HAS_D=D is not None, BR=BLOCK_ROWS,
                    BP=max(16, next_power_of_2(P)))
        _skip_gate_fwd[(cdiv(rows, BLOCK_ROWS),)](y, v, diag, corr if corr is not None else diag,
                                                  D if D is not None else diag, zz, out, rows, L, H, P,
                                                  *zz.stride()[:3], **meta)
        ctx.save_for_backward(y, v, diag, z, corr, D)
        ctx.meta = meta
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        y, v, diag, z, corr, D = ctx.saved_tensors
        batch, L, H, P = y.shape
        rows = batch * L * H
        if g.stride(-1) != 1:
            g = g.contiguous()
        dy = torch.empty_like(y)
        dv = torch.empty_like(v)
        ddiag = torch.empty_like(diag)
        dqk, dcorr = (torch.empty_like(diag), torch.empty_like(diag)) if corr is not None else (ddiag, ddiag)
        dz = torch.empty(z.shape, device=z.device, dtype=z.dtype) if z is not None else None
        zz = z if z is not None else y
        _skip_gate_bwd[(cdiv(rows, BLOCK_ROWS),)](
            y, v, diag, corr if corr is not None else diag, D if D is not None else diag, zz, g, dy, dv, ddiag,
            dqk, dcorr, dz if dz is not None else dy, rows, L, H, P, *zz.stride()[:3], *g.stride()[:3], **ctx.meta)
        if corr is None:
            return dy, dv, ddiag, dz, None, None, None
        dD = ddiag.sum((0, 1)).to(D.dtype) if D is not None and ctx.needs_input_grad[6] else None
        return dy, dv, dqk, dz, None, dcorr, dD


def skip_gate(y: Tensor, v: Tensor, diag: Tensor, z: Optional[Tensor], out_dtype: torch.dtype,
              corr: Optional[Tensor] = None, D: Optional[Tensor] = None) -> Tensor:
    """((y + diag[..., None] * v) * silu(z)).to(out_dtype) (without z: no gate), differentiable in y, v, diag, z
    (and corr, D). With corr, diag is replaced by diag * corr + D (D optional; ignored without corr).

    y, v: (batch, seqlen, nheads, headdim) float32; diag, corr: (batch, seqlen, nheads) float32; D: (nheads,) any
    float dtype; z: like y in any float dtype and strides (last stride 1), or None. Returns (batch, seqlen, nheads,
    headdim) in out_dtype, contiguous."""
    y, v, diag = y.contiguous(), v.contiguous(), diag.contiguous()
    if corr is not None:
        corr = corr.contiguous()
        D = D.contiguous() if D is not None else None
    else:
        D = None
    if z is not None and z.stride(-1) != 1:
        z = z.contiguous()
    return _SkipGate.apply(y, v, diag, z, out_dtype, corr, D)
