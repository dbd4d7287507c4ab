"""Triton kernels of the chunked SSD (Mamba-2), forward and backward, on tensor cores.

The math is that of :func:`mambakit.ops.ssd.ssd_chunked`. Per (batch, head) the sequence is cut into chunks of ``Q``
positions. With ``a`` the within-chunk inclusive cumsum of ``dt * A`` and ``X~ = dt * x``::

    S_c      = sum_s exp(a_last - a_s) B_s X~_s^T             chunk-local state        (d_state, headdim)
    H_{c+1}  = exp(a_last) H_c + S_c                           state passing (sequential over chunks only)
    y_t      = sum_{s<=t} (C_t . B_s) exp(a_t - a_s) X~_s      intra-chunk, (C B^T o L) X~ : two matmuls
             + exp(a_t) C_t H_c                                 inter-chunk read-out       : one matmul

Kernels (forward): ``_chunk_state_fwd`` (cumsum + S_c), ``_state_passing_fwd`` (H_c, final state),
``_chunk_scan_fwd`` (y). Backward: ``_chunk_read_bwd`` (gradient of H_c from the read-out), ``_state_passing_bwd``
(reverse pass over chunks), ``_chunk_bwd`` (dx, ddt, dB, dC, dA per chunk; one program per (chunk, batch, group)
loops over the group's heads so that dB and dC are summed in registers: no atomics, bit-identical gradients run
after run). The states that are kept (H_c at chunk starts) are O(batch * nheads * headdim * d_state * seqlen / Q).

``seq_idx`` (packed sequences) is handled by masks: a decay that crosses a sequence boundary is zero.

The kernels take the already processed dt (bias, softplus, clamp: done by the caller in PyTorch) in float32 and
return y without the D skip and the z gate (also done by the caller, so autograd handles them).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

# Triton decides at decoration time whether a kernel is compiled or interpreted: remember which one this module got.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

@triton.jit
def _decay_masks(acs, seg, seg_prev, HAS_SEG: tl.constexpr, Q: tl.constexpr):
    """acs, seg: (Q,). Returns (a_last, L (Q,Q), e (Q,), w (Q,), alpha) with masks applied.

    L[t, s] = exp(a_t - a_s) for s <= t in the same sequence; e_t = exp(a_t) if t is still in the sequence that
    entered the chunk; w_s = exp(a_last - a_s) if s is in the chunk's last sequence; alpha = exp(a_last) if the chunk
    holds no boundary."""
    idx = tl.arange(0, Q)
    a_last = tl.sum(tl.where(idx == Q - 1, acs, 0.0), axis=0)
    keep = idx[:, None] >= idx[None, :]
    keep_e = idx >= 0
    keep_w = idx >= 0
    alpha = tl.exp(a_last)
    if HAS_SEG:
        seg_last = tl.sum(tl.where(idx == Q - 1, seg, 0), axis=0)
        keep = keep & (seg[:, None] == seg[None, :])
        keep_e = seg == seg_prev
        keep_w = seg == seg_last
        alpha = tl.where(seg_last == seg_prev, alpha, 0.0)
    L = tl.exp(tl.where(keep, acs[:, None] - acs[None, :], float("-inf")))
    e = tl.where(keep_e, tl.exp(acs), 0.0)
    w = tl.where(keep_w, tl.exp(a_last - acs), 0.0)
    return a_last, L, e, w, alpha


@triton.jit
def _head_coords(seqlen, nheads, heads_per_group, Q: tl.constexpr):
    """Program ids (chunk, batch * nheads) -> chunk c, batch b, head h, group g, positions t (Q,), t < seqlen."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nheads).to(tl.int64)
    h = bh % nheads
    g = h // heads_per_group
    t = c * Q + tl.arange(0, Q)
    return c, b, h, g, t, t < seqlen


@triton.jit
def _load_seg(seg_ptr, b, c, Lpad, Q: tl.constexpr, HAS_SEG: tl.constexpr):
    """Segment ids of chunk c (Q,) and the segment entering it (that of the previous chunk's last position)."""
    if HAS_SEG:
        base = seg_ptr + b * Lpad
        seg = tl.load(base + c * Q + tl.arange(0, Q))
        seg_prev = tl.load(base + tl.maximum(c * Q - 1, 0))
        seg_prev = tl.where(c == 0, 0, seg_prev)
    else:
        seg = tl.zeros((Q,), dtype=tl.int32)
        seg_prev = 0
    return seg, seg_prev


@triton.jit
def _chunk_alpha(acs_ptr, seg_ptr, b, h, c, nheads, Lpad, HAS_SEG: tl.constexpr, Q: tl.constexpr):
    """Decay over the whole chunk c, exp(a_last); 0 if a sequence boundary lies in it."""
    alpha = tl.exp(tl.load(acs_ptr + (b * nheads + h) * Lpad + c * Q + Q - 1))
    if HAS_SEG:
        seg_last = tl.load(seg_ptr + b * Lpad + c * Q + Q - 1)
        seg_prev = tl.where(c == 0, 0, tl.load(seg_ptr + b * Lpad + tl.maximum(c * Q - 1, 0)))
        alpha = tl.where(seg_last == seg_prev, alpha, 0.0)
    return alpha


@triton.jit
def _load_D(D_ptr, h, p, P, D_HDIM: tl.constexpr):
    """The skip weight of head h for channels p: (BP,) float32 (D is (nheads,) or (nheads, headdim))."""
    if D_HDIM:
        return tl.load(D_ptr + h * P + p, mask=p < P, other=0.0).to(tl.float32)
    return tl.load(D_ptr + h + p * 0).to(tl.float32)


@triton.jit
def _chunk_state_fwd(x_ptr, dt_ptr, A_ptr, B_ptr, seg_ptr, acs_ptr, S_ptr,
                     seqlen, nheads, heads_per_group, P, N, nchunks, Lpad,
                     sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n,
                     HAS_SEG: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                     PREC: tl.constexpr):
    c, b, h, g, t, valid = _head_coords(seqlen, nheads, heads_per_group, Q)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    dt = tl.load(dt_ptr + (b * nheads + h) * Lpad + t)  # padded with zeros by the caller
    A = tl.load(A_ptr + h)
    acs = tl.cumsum(dt * A, axis=0)
    tl.store(acs_ptr + (b * nheads + h) * Lpad + t, acs)
    seg, seg_prev = _load_seg(seg_ptr, b, c, Lpad, Q, HAS_SEG)
    a_last, L, e, w, alpha = _decay_masks(acs, seg, seg_prev, HAS_SEG, Q)
    x = tl.load(x_ptr + b * sx_b + t[:, None] * sx_l + h * sx_h + p[None, :] * sx_p,
                mask=valid[:, None] & (p < P)[None, :], other=0.0)
    Bm = tl.load(B_ptr + b * sB_b + t[:, None] * sB_l + g * sB_g + n[None, :] * sB_n,
                 mask=valid[:, None] & (n < N)[None, :], other=0.0)
    xw = (x.to(tl.float32) * (w * dt)[:, None]).to(Bm.dtype)
    S = tl.dot(tl.trans(Bm), xw, input_precision=PREC)  # (BN, BP)
    off = ((b * nchunks + c) * nheads + h) * P * N
    tl.store(S_ptr + off + p[None, :] * N + n[:, None], S, mask=(n < N)[:, None] & (p < P)[None, :])


@triton.jit
def _state_passing_fwd(S_ptr, acs_ptr, seg_ptr, init_ptr, H_ptr, final_ptr,
                       nheads, PN, nchunks, Lpad,
                       HAS_INIT: tl.constexpr, HAS_SEG: tl.constexpr, Q: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // nheads).to(tl.int64)
    h = bh % nheads
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_INIT:
        state = tl.load(init_ptr + (b * nheads + h) * PN + offs, mask=m, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(nchunks):
        off = ((b * nchunks + c) * nheads + h) * PN
        tl.store(H_ptr + off + offs, state.to(H_ptr.dtype.element_ty), mask=m)
        alpha = _chunk_alpha(acs_ptr, seg_ptr, b, h, c, nheads, Lpad, HAS_SEG, Q)
        state = alpha * state + tl.load(S_ptr + off + offs, mask=m, other=0.0)
    tl.store(final_ptr + (b * nheads + h) * PN + offs, state, mask=m)


@triton.jit
def _chunk_scan_fwd(x_ptr, dt_ptr, B_ptr, C_ptr, D_ptr, seg_ptr, acs_ptr, H_ptr, y_ptr,
                    seqlen, nheads, heads_per_group, P, N, nchunks, Lpad,
                    sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                    sy_b, sy_l, sy_h, sy_p,
                    HAS_SEG: tl.constexpr, HAS_D: tl.constexpr, D_HDIM: tl.constexpr, Q: tl.constexpr,
                    BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    c, b, h, g, t, valid = _head_coords(seqlen, nheads, heads_per_group, Q)
    p = tl.program_id(2) * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    dt = tl.load(dt_ptr + (b * nheads + h) * Lpad + t)
    acs = tl.load(acs_ptr + (b * nheads + h) * Lpad + t)
    seg, seg_prev = _load_seg(seg_ptr, b, c, Lpad, Q, HAS_SEG)
    a_last, L, e, w, alpha = _decay_masks(acs, seg, seg_prev, HAS_SEG, Q)
    mn = valid[:, None] & (n < N)[None, :]
    Cm = tl.load(C_ptr + b * sC_b + t[:, None] * sC_l + g * sC_g + n[None, :] * sC_n, mask=mn, other=0.0)
    Bm = tl.load(B_ptr + b * sB_b + t[:, None] * sB_l + g * sB_g + n[None, :] * sB_n, mask=mn, other=0.0)
    mp = valid[:, None] & (p < P)[None, :]
    x = tl.load(x_ptr + b * sx_b + t[:, None] * sx_l + h * sx_h + p[None, :] * sx_p, mask=mp, other=0.0)
    CB = tl.dot(Cm, tl.trans(Bm), input_precision=PREC)  # (Q, Q)
    M = (CB * L * dt[None, :]).to(x.dtype)
    y = tl.dot(M, x, input_precision=PREC)
    off = ((b * nchunks + c) * nheads + h) * P * N
    H = tl.load(H_ptr + off + p[None, :] * N + n[:, None], mask=(n < N)[:, None] & (p < P)[None, :], other=0.0)
    y += e[:, None] * tl.dot(Cm, H.to(Cm.dtype), input_precision=PREC)
    if HAS_D:
        y += x.to(tl.float32) * _load_D(D_ptr, h, p, P, D_HDIM)[None, :]
    tl.store(y_ptr + b * sy_b + t[:, None] * sy_l + h * sy_h + p[None, :] * sy_p, y.to(y_ptr.dtype.element_ty),
             mask=mp)


@triton.jit
def _chunk_read_bwd(dy_ptr, C_ptr, seg_ptr, acs_ptr, dHl_ptr,
                    seqlen, nheads, heads_per_group, P, N, nchunks, Lpad,
                    sdy_b, sdy_l, sdy_h, sdy_p, sC_b, sC_l, sC_g, sC_n,
                    HAS_SEG: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                    PREC: tl.constexpr):
    """Gradient of the state entering chunk c from that chunk's read-out: sum_t e_t C_t^T dy_t  (N, P)."""
    c, b, h, g, t, valid = _head_coords(seqlen, nheads, heads_per_group, Q)
    p = tl.program_id(2) * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    acs = tl.load(acs_ptr + (b * nheads + h) * Lpad + t)
    seg, seg_prev = _load_seg(seg_ptr, b, c, Lpad, Q, HAS_SEG)
    a_last, L, e, w, alpha = _decay_masks(acs, seg, seg_prev, HAS_SEG, Q)
    Cm = tl.load(C_ptr + b * sC_b + t[:, None] * sC_l + g * sC_g + n[None, :] * sC_n,
                 mask=valid[:, None] & (n < N)[None, :], other=0.0)
    dy = tl.load(dy_ptr + b * sdy_b + t[:, None] * sdy_l + h * sdy_h + p[None, :] * sdy_p,
                 mask=valid[:, None] & (p < P)[None, :], other=0.0)
    Ce = (Cm.to(tl.float32) * e[:, None]).to(dy.dtype)
    dH = tl.dot(tl.trans(Ce), dy, input_precision=PREC)  # (BN, BP)
    off = ((b * nchunks + c) * nheads + h) * P * N
    tl.store(dHl_ptr + off + p[None, :] * N + n[:, None], dH, mask=(n < N)[:, None] & (p < P)[None, :])


@triton.jit
def _state_passing_bwd(dHl_ptr, H_ptr, acs_ptr, seg_ptr, dfinal_ptr, G_ptr, dinit_ptr, dlast_ptr,
                       nheads, PN, nchunks, Lpad, nblocks,
                       HAS_DFINAL: tl.constexpr, HAS_SEG: tl.constexpr, Q: tl.constexpr, BLOCK: tl.constexpr):
    """Reverse pass: G_c = gradient of the state at the END of chunk c; dinit; and per block the part of the
    gradient of a_last that comes through alpha (alpha * <G_c, H_c>)."""
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    b = (bh // nheads).to(tl.int64)
    h = bh % nheads
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_DFINAL:
        grad = tl.load(dfinal_ptr + (b * nheads + h) * PN + offs, mask=m, other=0.0).to(tl.float32)
    else:
        grad = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        off = ((b * nchunks + c) * nheads + h) * PN
        tl.store(G_ptr + off + offs, grad, mask=m)
        alpha = _chunk_alpha(acs_ptr, seg_ptr, b, h, c, nheads, Lpad, HAS_SEG, Q)
        H = tl.load(H_ptr + off + offs, mask=m, other=0.0)
        tl.store(dlast_ptr + ((b * nheads + h) * nchunks + c) * nblocks + blk, alpha * tl.sum(grad * H, axis=0))
        grad = alpha * grad + tl.load(dHl_ptr + off + offs, mask=m, other=0.0)
    tl.store(dinit_ptr + (b * nheads + h) * PN + offs, grad, mask=m)


@triton.jit
def _chunk_bwd(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, seg_ptr, acs_ptr, H_ptr, G_ptr, dy_ptr, dlast_ptr,
               dx_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr,
               seqlen, nheads, ngroups, heads_per_group, heads_per_split, P, N, nchunks, Lpad,
               sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
               sdy_b, sdy_l, sdy_h, sdy_p, sdx_b, sdx_l, sdx_h, sdx_p,
               HAS_SEG: tl.constexpr, HAS_D: tl.constexpr, D_HDIM: tl.constexpr, Q: tl.constexpr,
               BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, DO_DX: tl.constexpr, DO_DBC: tl.constexpr):
    """One program per (chunk, batch * group[, head split]): loops over the (split's) heads of the group.
    DO_DX: the per-head gradients (dx, ddt, dA, dD); DO_DBC: dB and dC summed over the heads (both, or one each
    in two launches: see `_Plan.split_bwd`).

    Writes dx (x's shape, float32), ddt (batch, nheads, Lpad) float32, the per-chunk part of dA
    (batch, nheads, nchunks), dB and dC ((batch, seqlen, ngroups, d_state) float32), and with D the per-chunk
    sums of dy * x (batch, nchunks, nheads, BP)."""
    c = tl.program_id(0)
    bg = tl.program_id(1)
    split = tl.program_id(2).to(tl.int64)
    b = (bg // ngroups).to(tl.int64)
    g = bg % ngroups
    idx = tl.arange(0, Q)
    t = c * Q + idx
    valid = t < seqlen
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    mn = valid[:, None] & (n < N)[None, :]
    mp = valid[:, None] & (p < P)[None, :]
    mpn = (p < P)[:, None] & (n < N)[None, :]
    Cm = tl.load(C_ptr + b * sC_b + t[:, None] * sC_l + g * sC_g + n[None, :] * sC_n, mask=mn, other=0.0)
    Bm = tl.load(B_ptr + b * sB_b + t[:, None] * sB_l + g * sB_g + n[None, :] * sB_n, mask=mn, other=0.0)
    if DO_DX:
        CB = tl.dot(Cm, tl.trans(Bm), input_precision=PREC)  # (Q, Q): CB[t, s] = C_t . B_s
    dB = tl.zeros((Q, BN), dtype=tl.float32)
    dC = tl.zeros((Q, BN), dtype=tl.float32)
    seg, seg_prev = _load_seg(seg_ptr, b, c, Lpad, Q, HAS_SEG)
    for j in range(heads_per_split):
        h = g * heads_per_group + split * heads_per_split + j
        row = (b * nheads + h) * Lpad
        dt = tl.load(dt_ptr + row + t)
        acs = tl.load(acs_ptr + row + t)
        A = tl.load(A_ptr + h)
        a_last, L, e, w, alpha = _decay_masks(acs, seg, seg_prev, HAS_SEG, Q)
        x = tl.load(x_ptr + b * sx_b + t[:, None] * sx_l + h * sx_h + p[None, :] * sx_p, mask=mp, other=0.0)
        dy = tl.load(dy_ptr + b * sdy_b + t[:, None] * sdy_l + h * sdy_h + p[None, :] * sdy_p, mask=mp, other=0.0)
        xt = (x.to(tl.float32) * dt[:, None]).to(x.dtype)  # X~ = dt * x
        off = ((b * nchunks + c) * nheads + h) * P * N
        Hc = tl.load(H_ptr + off + p[:, None] * N + n[None, :], mask=mpn, other=0.0).to(Cm.dtype)  # (BP, BN)
        Gc = tl.load(G_ptr + off + p[:, None] * N + n[None, :], mask=mpn, other=0.0).to(Cm.dtype)  # (BP, BN)
        Gxy = tl.dot(dy, tl.trans(xt), input_precision=PREC)  # (Q, Q): dy_t . X~_s
        GL = Gxy * L
        dC_in = e[:, None] * tl.dot(dy, Hc, input_precision=PREC)  # (Q, BN): from the read-out y_t += e_t C_t H
        dB_st = w[:, None] * tl.dot(xt, Gc, input_precision=PREC)  # (Q, BN): from S = sum_s w_s B_s X~_s^T
        if DO_DBC:
            dC += tl.dot(GL.to(Bm.dtype), Bm, input_precision=PREC) + dC_in
            dB += tl.dot(tl.trans(GL).to(Cm.dtype), Cm, input_precision=PREC) + dB_st
        if DO_DX:
            CBL = (CB * L).to(dy.dtype)
            dxt = tl.dot(tl.trans(CBL), dy, input_precision=PREC)  # (Q, BP)
            dxt += w[:, None] * tl.dot(Bm, tl.trans(Gc), input_precision=PREC)
            T = GL * CB
            da = tl.sum(T, axis=1) - tl.sum(T, axis=0)
            da += tl.sum(dC_in * Cm.to(tl.float32), axis=1)
            u = tl.sum(dB_st * Bm.to(tl.float32), axis=1)  # (Q,)
            d_last = tl.sum(u, axis=0) + tl.load(dlast_ptr + (b * nheads + h) * nchunks + c)
            da = da - u + tl.where(idx == Q - 1, d_last, 0.0)
            rc = tl.cumsum(da, axis=0, reverse=True)  # gradient of dt_t * A
            xf = x.to(tl.float32)
            ddt = rc * A + tl.sum(dxt * xf, axis=1)
            tl.store(ddt_ptr + row + t, ddt)
            tl.store(dA_ptr + (b * nheads + h) * nchunks + c, tl.sum(rc * dt, axis=0))
            dx = dxt * dt[:, None]
            if HAS_D:
                dyf = dy.to(tl.float32)
                dx += dyf * _load_D(D_ptr, h, p, P, D_HDIM)[None, :]
                tl.store(dD_ptr + ((b * nchunks + c) * nheads + h) * BP + p, tl.sum(dyf * xf, axis=0))
            tl.store(dx_ptr + b * sdx_b + t[:, None] * sdx_l + h * sdx_h + p[None, :] * sdx_p, dx, mask=mp)
    if DO_DBC:
        part = split * tl.num_programs(1) // ngroups * Lpad * ngroups * N  # this split's (batch, Lpad, ngroups, N)
        tl.store(dB_ptr + part + ((b * Lpad + t[:, None]) * ngroups + g) * N + n[None, :], dB, mask=mn)
        tl.store(dC_ptr + part + ((b * Lpad + t[:, None]) * ngroups + g) * N + n[None, :], dC, mask=mn)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def _pow2(v: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(v))


def _chunk_len(d_state: int, headdim: int, chunk_size: int, itemsize: int) -> int:
    """Positions per chunk: a power of two in [16, chunk_size] small enough for the (Q x Q) and (Q x d_state) tiles
    to fit in registers and shared memory (the result does not depend on it: chunking only reorders the sums).
    float32 tiles take twice the room of 16-bit ones."""
    cap = 64 if max(d_state, headdim) <= 128 else 32
    if itemsize > 2:
        cap //= 2
    q = 16
    while q * 2 <= min(cap, chunk_size):
        q *= 2
    return q


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _padded_rows(t: Tensor, Lpad: int) -> Tensor:
    """(batch, seqlen, nheads) -> (batch, nheads, Lpad) float32, zero-padded."""
    out = t.new_zeros((t.shape[0], t.shape[2], Lpad), dtype=torch.float32)
    out[:, :, : t.shape[1]] = t.transpose(1, 2)
    return out


def _padded_segments(seg: Optional[Tensor], Lpad: int) -> Optional[Tensor]:
    if seg is None:
        return None
    out = seg[:, -1:].expand(seg.shape[0], Lpad).to(torch.int32).clone()
    out[:, : seg.shape[1]] = seg
    return out.contiguous()


#: Run the backward's per-head gradients and its dB/dC sums as two launches of `_chunk_bwd` (fewer live registers
#: in each) instead of one.
SPLIT_BACKWARD = True


class _Plan:
    """Shapes and launch parameters shared by forward and backward."""

    def __init__(self, x: Tensor, B: Tensor, chunk_size: int) -> None:
        self.batch, self.seqlen, self.nheads, self.P = x.shape
        self.ngroups, self.N = B.shape[2], B.shape[3]
        self.hpg = self.nheads // self.ngroups
        self.Q = _chunk_len(self.N, self.P, chunk_size, x.element_size())
        self.nchunks = -(-self.seqlen // self.Q)
        self.Lpad = self.nchunks * self.Q
        self.BP, self.BN = _pow2(self.P), _pow2(self.N)
        self.prec = _precision(x.dtype)
        self.PN = self.P * self.N
        self.BLOCK = min(1024, triton.next_power_of_2(self.PN))
        self.nblocks = triton.cdiv(self.PN, self.BLOCK)
        # H100 sweep (benchmarks/sweep_ssd_bwd.py): two launches; 4 warps at d_state 64, 8 at 128; 2 stages
        self.bwd_stages = 2 if x.element_size() == 2 else 1
        self.bwd_warps = 4 if self.BP * self.BN <= 4096 else 8
        self.split_bwd = SPLIT_BACKWARD

    def head_splits(self, target_programs: int = 256) -> int:
        """The backward sums dB and dC over a group's heads in registers; with few (chunk, batch, group) programs
        the heads are split over this many programs (a power of two dividing heads_per_group), whose partial sums
        are then added in a fixed order."""
        splits = 1
        while (self.hpg % (splits * 2) == 0
               and self.nchunks * self.batch * self.ngroups * splits < target_programs):
            splits *= 2
        return splits


def ssd_forward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                initial_states: Optional[Tensor], seg: Optional[Tensor], chunk_size: int) -> Tuple[Tensor, Tensor, Tuple[Tensor, ...]]:
    """x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads) processed, float32; A: (nheads,) float32;
    B, C: (batch, seqlen, ngroups, d_state); D: (nheads,) or (nheads, headdim) float32 or None; initial_states: (batch, nheads, headdim, d_state) or None;
    seg: (batch, seqlen) segment numbers or None. x, B, C share one dtype. chunk_size: upper bound of the chunk.

    Returns y (x's layout and dtype, with D * x, without the gate), the final state (float32) and what the backward needs."""
    pl = _Plan(x, B, chunk_size)
    dev = x.device
    dtp = _padded_rows(dt, pl.Lpad)
    segp = _padded_segments(seg, pl.Lpad)
    has_seg = segp is not None
    segp_arg = segp if has_seg else dtp
    acs = torch.empty_like(dtp)
    S = torch.empty((pl.batch, pl.nchunks, pl.nheads, pl.P, pl.N), device=dev, dtype=torch.float32)
    grid = (pl.nchunks, pl.batch * pl.nheads)
    _chunk_state_fwd[grid](x, dtp, A, B, segp_arg, acs, S, pl.seqlen, pl.nheads, pl.hpg, pl.P, pl.N, pl.nchunks,
                           pl.Lpad, *x.stride(), *B.stride(), HAS_SEG=has_seg, Q=pl.Q, BP=pl.BP, BN=pl.BN,
                           PREC=pl.prec, num_warps=4)
    H = torch.empty_like(S, dtype=x.dtype if x.element_size() == 2 else torch.float32)
    final = torch.empty((pl.batch, pl.nheads, pl.P, pl.N), device=dev, dtype=torch.float32)
    init = initial_states.float().contiguous() if initial_states is not None else final
    _state_passing_fwd[(pl.batch * pl.nheads, pl.nblocks)](
        S, acs, segp_arg, init, H, final, pl.nheads, pl.PN, pl.nchunks, pl.Lpad,
        HAS_INIT=initial_states is not None, HAS_SEG=has_seg, Q=pl.Q, BLOCK=pl.BLOCK, num_warps=4)
    del S
    y = torch.empty_like(x)
    BPy = min(pl.BP, 64)
    _chunk_scan_fwd[(pl.nchunks, pl.batch * pl.nheads, triton.cdiv(pl.P, BPy))](
        x, dtp, B, C, D if D is not None else dtp, segp_arg, acs, H, y, pl.seqlen, pl.nheads, pl.hpg, pl.P, pl.N, pl.nchunks, pl.Lpad,
        *x.stride(), *B.stride(), *C.stride(), *y.stride(), HAS_SEG=has_seg, HAS_D=D is not None,
        D_HDIM=D is not None and D.dim() == 2, Q=pl.Q, BP=BPy, BN=pl.BN,
        PREC=pl.prec, num_warps=4)
    return y, final, (dtp, segp, acs, H)


def ssd_backward(x: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], saved: Tuple[Tensor, ...],
                 dy: Tensor, dfinal: Optional[Tensor], chunk_size: int) -> Tuple[Optional[Tensor], ...]:
    """Gradients (dx, ddt, dA, dB, dC, dD, dinit) in float32; dx: x's shape, ddt: (batch, seqlen, nheads),
    dA: (nheads,), dB, dC: B's shape, dD: D's shape (None without D), dinit: (batch, nheads, headdim, d_state)."""
    dtp, segp, acs, H = saved
    pl = _Plan(x, B, chunk_size)
    dev = x.device
    has_seg = segp is not None
    segp_arg = segp if has_seg else dtp
    dy = dy.to(x.dtype)
    dHl = torch.empty_like(H, dtype=torch.float32)
    BPy = min(pl.BP, 64)
    _chunk_read_bwd[(pl.nchunks, pl.batch * pl.nheads, triton.cdiv(pl.P, BPy))](
        dy, C, segp_arg, acs, dHl, pl.seqlen, pl.nheads, pl.hpg, pl.P, pl.N, pl.nchunks, pl.Lpad,
        *dy.stride(), *C.stride(), HAS_SEG=has_seg, Q=pl.Q, BP=BPy, BN=pl.BN, PREC=pl.prec, num_warps=4)
    G = torch.empty_like(H, dtype=torch.float32)
    dinit = torch.empty((pl.batch, pl.nheads, pl.P, pl.N), device=dev, dtype=torch.float32)
    dlast = torch.empty((pl.batch, pl.nheads, pl.nchunks, pl.nblocks), device=dev, dtype=torch.float32)
    dfin = dfinal.float().contiguous() if dfinal is not None else dinit
    _state_passing_bwd[(pl.batch * pl.nheads, pl.nblocks)](
        dHl, H, acs, segp_arg, dfin, G, dinit, dlast, pl.nheads, pl.PN, pl.nchunks, pl.Lpad, pl.nblocks,
        HAS_DFINAL=dfinal is not None, HAS_SEG=has_seg, Q=pl.Q, BLOCK=pl.BLOCK, num_warps=4)
    del dHl
    dlast = dlast.sum(-1) if pl.nblocks > 1 else dlast[..., 0].contiguous()
    dx = torch.empty(x.shape, device=dev, dtype=torch.float32)
    ddt = torch.empty_like(dtp)
    dA_part = torch.empty((pl.batch, pl.nheads, pl.nchunks), device=dev, dtype=torch.float32)
    splits = pl.head_splits()
    dB = torch.empty((splits, pl.batch, pl.Lpad, pl.ngroups, pl.N), device=dev, dtype=torch.float32)
    dC = torch.empty_like(dB)
    dD_part = torch.empty((pl.batch, pl.nchunks, pl.nheads, pl.BP), device=dev, dtype=torch.float32) if D is not None \
        else dA_part
    def launch(n_splits: int, do_dx: bool, do_dbc: bool) -> None:
        _chunk_bwd[(pl.nchunks, pl.batch * pl.ngroups, n_splits)](
            x, dtp, A, B, C, D if D is not None else dtp, segp_arg, acs, H, G, dy, dlast, dx, ddt, dA_part, dB, dC,
            dD_part,
            pl.seqlen, pl.nheads, pl.ngroups, pl.hpg, pl.hpg // n_splits, pl.P, pl.N, pl.nchunks, pl.Lpad,
            *x.stride(), *B.stride(), *C.stride(), *dy.stride(), *dx.stride(), HAS_SEG=has_seg,
            HAS_D=D is not None, D_HDIM=D is not None and D.dim() == 2, Q=pl.Q, BP=pl.BP, BN=pl.BN,
            PREC=pl.prec, DO_DX=do_dx, DO_DBC=do_dbc, num_warps=pl.bwd_warps, num_stages=pl.bwd_stages)

    if pl.split_bwd:  # one program per head for dx/ddt/dA/dD, then dB/dC summed over the heads
        launch(pl.hpg, True, False)
        launch(splits, False, True)
    else:
        launch(splits, True, True)
    ddt = ddt[:, :, : pl.seqlen].transpose(1, 2)
    dD = None
    if D is not None:
        dD = dD_part.sum(dim=(0, 1))[:, : pl.P]
        dD = dD if D.dim() == 2 else dD.sum(-1)
    dB, dC = (t[0] if splits == 1 else t.sum(0) for t in (dB, dC))  # fixed order: deterministic
    return dx, ddt, dA_part.sum(dim=(0, 2)), dB[:, : pl.seqlen], dC[:, : pl.seqlen], dD, dinit


# ----------------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------------


class _SSDTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_states, seg, chunk_size):  # type: ignore[override]
        y, final, saved = ssd_forward(x, dt, A, B, C, D, initial_states, seg, chunk_size)
        dtp, segp, acs, H = saved
        ctx.save_for_backward(x, A, B, C, D, dtp, acs, H, segp)
        ctx.chunk_size = chunk_size
        ctx.has_init = initial_states is not None
        return y, final

    @staticmethod
    def backward(ctx, gy, gfinal):  # type: ignore[override]
        x, A, B, C, D, dtp, acs, H, segp = ctx.saved_tensors
        dy = gy if gy is not None else torch.zeros_like(x)
        dx, ddt, dA, dB, dC, dD, dinit = ssd_backward(x, A, B, C, D, (dtp, segp, acs, H), dy, gfinal,
                                                      ctx.chunk_size)
        return (dx.to(x.dtype), ddt, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dinit if ctx.has_init else None,
                None, None)


def ssd_triton_core(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                    initial_states: Optional[Tensor], seg: Optional[Tensor], chunk_size: int) -> Tuple[Tensor, Tensor]:
    """Differentiable SSD core with the D skip, without the gate. x: (batch, seqlen, nheads, headdim)
    float16/bfloat16/float32; dt: (batch, seqlen, nheads) processed; B, C are cast to x's dtype; D: (nheads,) or
    (nheads, headdim) or None. Returns y (x's dtype) and the final state (float32)."""
    io = x.dtype
    init = None if initial_states is None else initial_states.float()
    Df = None if D is None else D.float().contiguous()
    return _SSDTriton.apply(x, dt.float(), A.float().contiguous(), B.to(io), C.to(io), Df, init, seg, chunk_size)
