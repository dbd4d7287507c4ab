"""The SSD form's per-position prep from the layer's raw in_proj columns as one Triton kernel each way (standard
Triton only), in place of ~40 PyTorch ops forward and ~60 backward. Per (batch, head h), positions t::

    DT_t = softplus(dd_dt_t + dt_bias_h)            ADT_t = clamp(-f(dd_A_t), max=-A_floor) DT_t
    lambda_t = sigmoid(trap_t)                       gamma_t = lambda_t DT_t
    lb_t = (1 - lambda_{t+1}) DT_{t+1}               (0 at the last position and where a sequence starts at t + 1)
    scale_t = gamma_t + lb_t,  corr_t = gamma_t - scale_t = -lb_t,  first_back = (1 - lambda_0) DT_0
    theta_t = (angle0 [first sequence only] + sum_{s <= t, same sequence} pi tanh(angle_s) DT_s) mod 2 pi

with f the heavy-tail activation or softplus. The angles' sum runs in float64 through the whole sequence (one
program walks it in blocks, the carry in registers) as a segmented scan: a sequence start drops what came before
it (selected, not subtracted), so a non-finite value reaches only its own sequence's later positions.

Backward, per position (w_t the gradient of t's look-back weight: of lb_{t-1}, or of first_back at t = 0)::

    dDT_t = dgamma_t lambda_t + w_t (1 - lambda_t) + dADT_t A_t + sum_i dinc_{t,i} pi tanh(angle_{t,i})
    dlambda_t = (dgamma_t - w_t) DT_t,  dinc_s = sum_{t >= s, same sequence} dtheta_t      (a reversed scan)

The raw angles are shared by the heads: each head's program writes its part, summed over heads by the caller (in a
fixed order: deterministic), as are dt_bias's per-batch parts.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.ops.triton.grid import next_power_of_2
from mambakit.ops.triton.math import softplus, tanh

#: positions per block of the walk through the sequence
BLOCK_L = 32

PI = tl.constexpr(math.pi)
TWO_PI = tl.constexpr(2 * math.pi)


@triton.jit
def _seg_add(v1, f1, v2, f2):
    """Segmented sum: the right operand restarts the sum where its flag is set."""
    return tl.where(f2, v2, v1 + v2), f1 | f2


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _dt_lam(dt_ptr, trap_ptr, b, pos, h, m, bias, s_db, s_dl, s_dh, s_tb, s_tl, s_th, FP: tl.constexpr):
    """DT and lambda at the positions pos (0 where not m), and softplus's input."""
    pre = tl.load(dt_ptr + b * s_db + pos * s_dl + h * s_dh, mask=m, other=0.0).to(FP) + bias
    trap = tl.load(trap_ptr + b * s_tb + pos * s_tl + h * s_th, mask=m, other=0.0).to(FP)
    dt = tl.where(m, softplus(pre), 0.0)
    return dt, _sigmoid(trap), pre


@triton.jit
def _activation(x, a_floor, HEAVY: tl.constexpr):
    """A = clamp(-f(x), max=-a_floor), and dA/dx."""
    if HEAVY:
        r = 1.0 / (1.0 - tl.minimum(x, 0.0))
        f = tl.where(x >= 0, 1.0 + x, tl.where(x == x, r, x))  # the minimum above drops a NaN
        df = tl.where(x >= 0, 1.0, r * r)
    else:
        f = softplus(x)
        df = tl.where(x > 20.0, 1.0, _sigmoid(x))
    a = tl.where((-f <= -a_floor) | (f != f), -f, -a_floor)  # as torch.clamp: a NaN stays NaN
    return a, tl.where(-f <= -a_floor, -df, 0.0)


@triton.jit
def _starts(seq_ptr, b, pos, L, s_qb, s_ql, HAS_SEQ: tl.constexpr):
    """True where a packed sequence starts at pos (0 < pos < L and seq_idx changes)."""
    if HAS_SEQ:
        m = (pos > 0) & (pos < L)
        cur = tl.load(seq_ptr + b * s_qb + pos * s_ql, mask=m, other=0)
        prev = tl.load(seq_ptr + b * s_qb + (pos - 1) * s_ql, mask=m, other=0)
        return m & (cur != prev)
    else:
        return pos != pos  # all False


@triton.jit
def _prep_fwd(dt_ptr, bias_ptr, a_ptr, trap_ptr, ang_ptr, seq_ptr, ang0_ptr,
              adt_ptr, scale_ptr, corr_ptr, fb_ptr, th_ptr,
              L, H, S, a_floor,
              s_db, s_dl, s_dh, s_ab, s_al, s_ah, s_tb, s_tl, s_th, s_gb, s_gl, s_gs, s_qb, s_ql,
              HEAVY: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ANG0: tl.constexpr, SMALL: tl.constexpr,
              BL: tl.constexpr, BS: tl.constexpr):
    """One program per (batch, head), walking the positions in blocks of BL. Outputs: adt, scale, corr (batch, L,
    H), first_back (batch, H), theta (batch, L, H, S), contiguous in the compute dtype FP (adt's)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    FP: tl.constexpr = adt_ptr.dtype.element_ty
    bias = tl.load(bias_ptr + h).to(FP)
    i = tl.arange(0, BS)
    mi = i < S
    row = tl.arange(0, BL)
    dt0, lam0, pre0 = _dt_lam(dt_ptr, trap_ptr, b, 0, h, L > 0, bias, s_db, s_dl, s_dh, s_tb, s_tl, s_th, FP)
    tl.store(fb_ptr + b * H + h, (1.0 - lam0) * dt0)
    if HAS_ANG0:
        carry = tl.load(ang0_ptr + (b * H + h) * S + i, mask=mi, other=0.0).to(tl.float64)
    else:
        carry = tl.zeros((BS,), dtype=tl.float64)
    for l0 in range(0, L, BL):
        pos = l0 + row
        m = pos < L
        dt, lam, pre = _dt_lam(dt_ptr, trap_ptr, b, pos, h, m, bias, s_db, s_dl, s_dh, s_tb, s_tl, s_th, FP)
        mn = pos + 1 < L
        dtn, lamn, pren = _dt_lam(dt_ptr, trap_ptr, b, pos + 1, h, mn, bias, s_db, s_dl, s_dh, s_tb, s_tl, s_th, FP)
        lb = tl.where(mn & ~_starts(seq_ptr, b, pos + 1, L, s_qb, s_ql, HAS_SEQ), (1.0 - lamn) * dtn, 0.0)
        a, da = _activation(tl.load(a_ptr + b * s_ab + pos * s_al + h * s_ah, mask=m, other=0.0).to(FP), a_floor,
                           HEAVY)
        out = (b * L + pos) * H + h
        tl.store(adt_ptr + out, a * dt, mask=m)
        tl.store(scale_ptr + out, lam * dt + lb, mask=m)
        tl.store(corr_ptr + out, -lb, mask=m)
        # the angles: a segmented float64 scan, the carry (what the blocks before add) entering at row 0
        start = _starts(seq_ptr, b, pos, L, s_qb, s_ql, HAS_SEQ)
        mpi = m[:, None] & mi[None, :]
        ang = tl.load(ang_ptr + b * s_gb + pos[:, None] * s_gl + i[None, :] * s_gs, mask=mpi, other=0.0).to(FP)
        inc = tl.where(mpi, PI * tanh(ang, SMALL) * dt[:, None], 0.0).to(tl.float64)
        inc += tl.where(((row == 0) & ~start)[:, None], carry[None, :], 0.0)
        v, vflag = tl.associative_scan((inc, tl.broadcast_to(start[:, None], (BL, BS))), 0, _seg_add)
        carry = tl.sum(tl.where((row == BL - 1)[:, None], v, 0.0), axis=0)
        th = v - tl.floor(v / TWO_PI) * TWO_PI
        tl.store(th_ptr + out[:, None] * S + i[None, :], th.to(FP), mask=mpi)


@triton.jit
def _prep_bwd(dt_ptr, bias_ptr, a_ptr, trap_ptr, ang_ptr, seq_ptr,
              dadt_ptr, dscale_ptr, dcorr_ptr, dfb_ptr, dth_ptr,
              ddt_ptr, dbias_ptr, da_ptr, dtrap_ptr, dang_ptr, dang0_ptr,
              L, H, S, a_floor,
              s_db, s_dl, s_dh, s_ab, s_al, s_ah, s_tb, s_tl, s_th, s_gb, s_gl, s_gs, s_qb, s_ql,
              s_xb, s_xl, s_xh, s_cb, s_cl, s_ch, s_eb, s_el, s_eh,
              HEAVY: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_DFB: tl.constexpr, SMALL: tl.constexpr,
              BL: tl.constexpr, BS: tl.constexpr):
    """One program per (batch, head), walking the positions from the end in blocks of BL (row r of a block is
    position base - r). The output gradients: dadt, dscale, dcorr (batch, L, H) in FP with strides s_x*, s_c*,
    s_e*; dfb (batch, H) (HAS_DFB; else zero); dtheta (batch, L, H, S) contiguous. Written: ddt, da, dtrap (batch,
    L, H) contiguous in the inputs' dtypes; dbias (batch, H) and dang (batch, L, H, S), this head's parts, and dang0
    (batch, H, S), in FP."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    FP: tl.constexpr = dadt_ptr.dtype.element_ty
    bias = tl.load(bias_ptr + h).to(FP)
    i = tl.arange(0, BS)
    mi = i < S
    row = tl.arange(0, BL)
    carry = tl.zeros((BS,), dtype=tl.float64)
    dbias = tl.zeros((BL,), dtype=FP)
    if HAS_DFB:
        dfb = tl.load(dfb_ptr + b * H + h).to(FP)
    else:
        dfb = tl.zeros((), dtype=FP)
    for blk in range(0, tl.cdiv(L, BL)):
        pos = L - 1 - blk * BL - row
        m = pos >= 0
        dt, lam, pre = _dt_lam(dt_ptr, trap_ptr, b, pos, h, m, bias, s_db, s_dl, s_dh, s_tb, s_tl, s_th, FP)
        out = (b * L + pos) * H + h
        # the angles: dinc_t = the sum of dtheta from t to its sequence's end (the carry enters at row 0, the
        # block's last position, unless a sequence starts right after it)
        mpi = m[:, None] & mi[None, :]
        ends = _starts(seq_ptr, b, pos + 1, L, s_qb, s_ql, HAS_SEQ)
        g = tl.load(dth_ptr + out[:, None] * S + i[None, :], mask=mpi, other=0.0).to(tl.float64)
        g += tl.where(((row == 0) & ~ends)[:, None], carry[None, :], 0.0)
        dinc, dflag = tl.associative_scan((g, tl.broadcast_to(ends[:, None], (BL, BS))), 0, _seg_add)
        carry = tl.sum(tl.where((row == BL - 1)[:, None], dinc, 0.0), axis=0)
        dinc = dinc.to(FP)
        ang = tl.load(ang_ptr + b * s_gb + pos[:, None] * s_gl + i[None, :] * s_gs, mask=mpi, other=0.0).to(FP)
        t = tanh(ang, SMALL)
        tl.store(dang_ptr + out[:, None] * S + i[None, :], dinc * PI * (1.0 - t * t) * dt[:, None], mask=mpi)
        ddt = tl.sum(tl.where(mpi, dinc * PI * t, 0.0), axis=1)
        # the scalars
        dgam = tl.load(dscale_ptr + b * s_cb + pos * s_cl + h * s_ch, mask=m, other=0.0)
        dadt = tl.load(dadt_ptr + b * s_xb + pos * s_xl + h * s_xh, mask=m, other=0.0)
        mp = m & (pos > 0)
        wprev = tl.load(dscale_ptr + b * s_cb + (pos - 1) * s_cl + h * s_ch, mask=mp, other=0.0) \
            - tl.load(dcorr_ptr + b * s_eb + (pos - 1) * s_el + h * s_eh, mask=mp, other=0.0)
        w = tl.where(pos == 0, dfb, tl.where(_starts(seq_ptr, b, pos, L, s_qb, s_ql, HAS_SEQ), 0.0, wprev))
        x = tl.load(a_ptr + b * s_ab + pos * s_al + h * s_ah, mask=m, other=0.0).to(FP)
        a, da = _activation(x, a_floor, HEAVY)
        ddt += dgam * lam + w * (1.0 - lam) + dadt * a
        dlam = (dgam - w) * dt
        dpre = tl.where(m, ddt * tl.where(pre > 20.0, 1.0, _sigmoid(pre)), 0.0)
        dbias += dpre
        tl.store(ddt_ptr + out, dpre.to(ddt_ptr.dtype.element_ty), mask=m)
        tl.store(dtrap_ptr + out, (dlam * lam * (1.0 - lam)).to(dtrap_ptr.dtype.element_ty), mask=m)
        tl.store(da_ptr + out, (dadt * dt * da).to(da_ptr.dtype.element_ty), mask=m)
    tl.store(dbias_ptr + b * H + h, tl.sum(dbias, axis=0))
    tl.store(dang0_ptr + (b * H + h) * S + i, carry.to(FP), mask=mi)


class PrepOut(NamedTuple):
    """The fused prep's outputs, in the compute dtype: adt, scale, corr (batch, seqlen, nheads), first_back (batch,
    nheads), theta (batch, seqlen, nheads, n_angles) (its last position the final angle)."""

    adt: Tensor
    scale: Tensor
    corr: Tensor
    first_back: Tensor
    theta: Tensor


def _meta(S: int, fp: torch.dtype, heavy: bool, seq_idx: Optional[Tensor]) -> dict:
    return dict(HEAVY=heavy, HAS_SEQ=seq_idx is not None, SMALL=0.01 if fp == torch.float64 else 0.25, BL=BLOCK_L,
                BS=max(16, next_power_of_2(S)))


class _Prep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dd_dt, dt_bias, dd_A, trap, angle, angle0, seq_idx, a_floor, heavy, fp):  # type: ignore
        batch, L, H = dd_dt.shape
        S = angle.shape[-1]
        kw = dict(device=dd_dt.device, dtype=fp)
        adt, scale, corr = (torch.empty(batch, L, H, **kw) for _ in range(3))
        first_back = torch.empty(batch, H, **kw)
        theta = torch.empty(batch, L, H, S, **kw)
        seq = seq_idx if seq_idx is not None else dd_dt
        meta = _meta(S, fp, heavy, seq_idx)
        _prep_fwd[(batch, H)](
            dd_dt, dt_bias, dd_A, trap, angle, seq, angle0 if angle0 is not None else theta,
            adt, scale, corr, first_back, theta, L, H, S, a_floor,
            *dd_dt.stride(), *dd_A.stride(), *trap.stride(), *angle.stride(), *seq.stride()[:2],
            HAS_ANG0=angle0 is not None, **meta)
        ctx.save_for_backward(dd_dt, dt_bias, dd_A, trap, angle, seq_idx)
        ctx.set_materialize_grads(False)  # an unused output's gradient (first_back's without a state) stays None
        ctx.args = (a_floor, meta, angle0 is not None, fp, angle0.dtype if angle0 is not None else None)
        return adt, scale, corr, first_back, theta

    @staticmethod
    def backward(ctx, dadt, dscale, dcorr, dfb, dth):  # type: ignore[override]
        dd_dt, dt_bias, dd_A, trap, angle, seq_idx = ctx.saved_tensors
        a_floor, meta, has_ang0, fp, ang0_dtype = ctx.args
        batch, L, H = dd_dt.shape
        S = angle.shape[-1]
        kw = dict(device=dd_dt.device, dtype=fp)

        def grad(g, *shape, contiguous=True):
            if g is None:
                return torch.zeros(*shape, **kw)
            return g.to(fp).contiguous() if contiguous else g.to(fp)

        dadt, dscale, dcorr = (grad(g, batch, L, H, contiguous=False) for g in (dadt, dscale, dcorr))
        dth = grad(dth, batch, L, H, S)
        dfb = dfb.to(fp).contiguous() if dfb is not None else None
        ddt = torch.empty(batch, L, H, device=dd_dt.device, dtype=dd_dt.dtype)
        da = torch.empty(batch, L, H, device=dd_A.device, dtype=dd_A.dtype)
        dtrap = torch.empty(batch, L, H, device=trap.device, dtype=trap.dtype)
        dbias = torch.empty(batch, H, **kw)
        dang = torch.empty(batch, L, H, S, **kw)
        dang0 = torch.empty(batch, H, S, **kw)
        seq = seq_idx if seq_idx is not None else dd_dt
        _prep_bwd[(batch, H)](
            dd_dt, dt_bias, dd_A, trap, angle, seq, dadt, dscale, dcorr, dfb if dfb is not None else dth, dth,
            ddt, dbias, da, dtrap, dang, dang0, L, H, S, a_floor,
            *dd_dt.stride(), *dd_A.stride(), *trap.stride(), *angle.stride(), *seq.stride()[:2],
            *dadt.stride(), *dscale.stride(), *dcorr.stride(), HAS_DFB=dfb is not None, **meta)
        return (ddt, dbias.sum(0).to(dt_bias.dtype), da, dtrap, dang.sum(2).to(angle.dtype),
                dang0.to(ang0_dtype) if has_ang0 else None, None, None, None, None)


def position_prep(dd_dt: Tensor, dt_bias: Tensor, dd_A: Tensor, trap: Tensor, angle: Tensor,
                  angle0: Optional[Tensor], seq_idx: Optional[Tensor], A_floor: float, A_activation: str,
                  fp: torch.dtype) -> PrepOut:
    """dd_dt, dd_A, trap: (batch, seqlen, nheads) and angle (batch, seqlen, n_angles), any strides and float dtypes
    (the layer's in_proj columns); dt_bias (nheads,); angle0 (batch, nheads, n_angles) or None; seq_idx (batch,
    seqlen) integer or None; A_activation "heavy_tail" or "softplus"; fp the compute dtype (float32 or float64).
    Returns :class:`PrepOut` (the module's docstring); differentiable in every float tensor input."""
    return PrepOut(*_Prep.apply(dd_dt, dt_bias, dd_A, trap, angle, angle0, seq_idx, float(A_floor),
                                A_activation == "heavy_tail", fp))
