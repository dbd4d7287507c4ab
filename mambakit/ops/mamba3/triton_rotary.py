"""The SSD form's pre-processing of B and C as Triton kernels (standard Triton only): per head, bias, rotation and
the own-position product, forward and backward in one pass each, so that the (batch, seqlen, nheads, d_state)
tensors go through memory once (the PyTorch form makes a dozen passes over them).

Forward, per (batch, position, head h of group g)::

    q = Rot(theta)(Q[g] + Q_bias[h]),  k = Rot(theta)(K[g] + K_bias[h])      pairs (2i, 2i+1), i < n_angles
    qk = sum_n round(q)_n round(k)_n                                           (float32; round: to the output dtype)

Backward: with dq, dk the gradients of the rounded outputs (the rounding passes gradients through) and dqk that of
qk, ``gq = dq + dqk round(k)`` (and alike for k), ``d(Q + Q_bias) = Rot(-theta) gq``, summed over the group's heads
for dQ and over batch and positions for dQ_bias (partial sums per block of positions, added by the caller in a
fixed order: deterministic), and ``dtheta_i = sum over q and k of (gq_{2i+1} r_{2i} - gq_{2i} r_{2i+1})`` with r
the unrounded rotated values.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from mambakit.ops.triton.grid import cdiv, next_power_of_2
from torch import Tensor

#: positions per program
BLOCK_L = 32

#: with the folded norm: (positions per program, warps) forward and backward (at d_state 128, 32 angles, no
#: register spills on sm_90: the 4-warp blocks would spill)
NORM_FWD = (32, 8)
NORM_BWD = (16, 8)


@triton.jit
def _load_pairs(rows, c, mask2, BL: tl.constexpr, BS: tl.constexpr):
    """The even and odd entries (2i, 2i+1), i < BS, of each row as float32 (BL, BS) tiles, read as one contiguous
    (BL, 2 BS) tile (two stride-2 reads would touch every memory sector twice). rows: (BL, 1) pointers to each row's
    first entry; c: arange(0, 2 BS); mask2: (BL, 2 BS)."""
    x = tl.load(rows + c[None, :], mask=mask2, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(x, (BL, BS, 2)))


@triton.jit
def _store_pairs(rows, c, mask2, e, o, BL: tl.constexpr, BS: tl.constexpr):
    """Store (BL, BS) tiles e, o as the entries (2i, 2i+1) of each row, as one contiguous (BL, 2 BS) tile."""
    tl.store(rows + c[None, :], tl.reshape(tl.join(e, o), (BL, 2 * BS)), mask=mask2)


@triton.jit
def _pair_tiles(ptr, bias_ptr, b, pos, g, h, c, mask_pc, s_b, s_l, s_g, N, S, BL: tl.constexpr, BS: tl.constexpr):
    """The even and odd entries (2i, 2i+1) of X[b, pos, g] + bias[h] as float32 (BL, BS) tiles."""
    e, o = _load_pairs(ptr + b * s_b + pos[:, None] * s_l + g * s_g, c, mask_pc, BL, BS)
    be, bo = tl.split(tl.reshape(tl.load(bias_ptr + h * N + c, mask=c < 2 * S, other=0.0).to(tl.float32), (BS, 2)))
    return e + be[None, :], o + bo[None, :]


@triton.jit
def _rest_tile(ptr, bias_ptr, b, pos, g, h, j, mask_pj, s_b, s_l, s_g, N):
    """X[b, pos, g, j] + bias[h, j] (the unrotated dims j >= 2 n_angles) as a float32 (BL, BR) tile."""
    x = tl.load(ptr + b * s_b + pos[:, None] * s_l + g * s_g + j[None, :], mask=mask_pj, other=0.0).to(tl.float32)
    return x + tl.load(bias_ptr + h * N + j, mask=j < N, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _normed(ptr, w_ptr, b, pos, g, cc, mask_pc, j, mask_pj, s_b, s_l, s_g, N, S, eps, BL: tl.constexpr,
            BS: tl.constexpr, BR: tl.constexpr, HAS_REST: tl.constexpr):
    """RMSNorm(X[b, pos, g]) * w over the row's N entries (float32, rounded to X's dtype as the norm's output was),
    as float32 even / odd (BL, BS) tiles and the (BL, BR) rest; also xhat = X * rstd (the same tiles) and rstd."""
    rows = ptr + b * s_b + pos[:, None] * s_l + g * s_g
    e, o = _load_pairs(rows, cc, mask_pc, BL, BS)
    ss = tl.sum(e * e + o * o, axis=1)
    r = tl.zeros((BL, BR), dtype=tl.float32)
    if HAS_REST:
        r = tl.load(rows + j[None, :], mask=mask_pj, other=0.0).to(tl.float32)
        ss += tl.sum(r * r, axis=1)
    rstd = 1.0 / tl.sqrt(ss / N + eps)
    we, wo = tl.split(tl.reshape(tl.load(w_ptr + cc, mask=cc < 2 * S, other=0.0).to(tl.float32), (BS, 2)))
    wr = tl.load(w_ptr + j, mask=j < N, other=0.0).to(tl.float32)
    xe, xo, xr = e * rstd[:, None], o * rstd[:, None], r * rstd[:, None]
    dtype = ptr.dtype.element_ty
    ne = (xe * we[None, :]).to(dtype).to(tl.float32)
    no = (xo * wo[None, :]).to(dtype).to(tl.float32)
    nr = (xr * wr[None, :]).to(dtype).to(tl.float32)
    return ne, no, nr, xe, xo, xr, rstd


@triton.jit
def _norm_bwd(dw_ptr, ge, go, gr, xe, xo, xr, rstd, w_ptr, rows, cc, mask_pc, j, mask_pj, N, S,
              BL: tl.constexpr, BS: tl.constexpr, HAS_REST: tl.constexpr):
    """The RMSNorm's backward of the (BL, N) rows from the gradients ge, go, gr of its output: dX stored at rows
    (pointers to each row's first entry), this block's weight part (N,) at dw_ptr."""
    we, wo = tl.split(tl.reshape(tl.load(w_ptr + cc, mask=cc < 2 * S, other=0.0).to(tl.float32), (BS, 2)))
    wr = tl.load(w_ptr + j, mask=j < N, other=0.0).to(tl.float32)
    de, do, dr = ge * we[None, :], go * wo[None, :], gr * wr[None, :]
    c = tl.sum(de * xe + do * xo, axis=1)
    if HAS_REST:
        c += tl.sum(dr * xr, axis=1)
    c = c / N
    _store_pairs(rows, cc, mask_pc, (de - xe * c[:, None]) * rstd[:, None], (do - xo * c[:, None]) * rstd[:, None],
                 BL, BS)
    i = tl.arange(0, BS)
    tl.store(dw_ptr + 2 * i, tl.sum(ge * xe, axis=0), mask=i < S)
    tl.store(dw_ptr + 2 * i + 1, tl.sum(go * xo, axis=0), mask=i < S)
    if HAS_REST:
        tl.store(rows + j[None, :], (dr - xr * c[:, None]) * rstd[:, None], mask=mask_pj)
        tl.store(dw_ptr + j, tl.sum(gr * xr, axis=0), mask=j < N)


@triton.jit
def _bias_pairs(bias_ptr, h, c, N, S, BS: tl.constexpr):
    """bias[h]'s entries (2i, 2i+1), i < S, as float32 (BS,) vectors."""
    return tl.split(tl.reshape(tl.load(bias_ptr + h * N + c, mask=c < 2 * S, other=0.0).to(tl.float32), (BS, 2)))


@triton.jit
def _with_bias(nqe, nqo, nke, nko, Q_ptr, K_ptr, qb_ptr, kb_ptr, b, pos, g, h, cc, mask_pc, s_qb, s_ql, s_qg, s_kb,
               s_kl, s_kg, N, S, BL: tl.constexpr, BS: tl.constexpr, NORM: tl.constexpr):
    """Head h's inputs to the rotation, even and odd (BL, BS) float32 tiles of Q + Q_bias[h] and K + K_bias[h]: from
    the normed tiles nqe, nqo, nke, nko (NORM), else read from Q and K."""
    if NORM:
        be, bo = _bias_pairs(qb_ptr, h, cc, N, S, BS)
        qe, qo = nqe + be[None, :], nqo + bo[None, :]
        be, bo = _bias_pairs(kb_ptr, h, cc, N, S, BS)
        ke, ko = nke + be[None, :], nko + bo[None, :]
    else:
        qe, qo = _pair_tiles(Q_ptr, qb_ptr, b, pos, g, h, cc, mask_pc, s_qb, s_ql, s_qg, N, S, BL, BS)
        ke, ko = _pair_tiles(K_ptr, kb_ptr, b, pos, g, h, cc, mask_pc, s_kb, s_kl, s_kg, N, S, BL, BS)
    return qe, qo, ke, ko


@triton.jit
def _rotary_fwd(Q_ptr, K_ptr, qb_ptr, kb_ptr, th_ptr, q_ptr, k_ptr, qk_ptr, qw_ptr, kw_ptr,
                seqlen, nheads, hpg, N, S, eps,
                s_qb, s_ql, s_qg, s_kb, s_kl, s_kg,
                BL: tl.constexpr, BS: tl.constexpr, BR: tl.constexpr, HAS_REST: tl.constexpr, NORM: tl.constexpr):
    """One program per (batch * head, block of BL positions): q, k (batch, seqlen, nheads, N) in their dtype and qk
    (batch, seqlen, nheads) float32; theta (batch, seqlen, nheads, S) float32, contiguous like the outputs. NORM:
    Q and K are first RMSNorm-ed over N with the weights qw, kw (N,) and eps."""
    bh = tl.program_id(0)
    b = (bh // nheads).to(tl.int64)
    h = bh % nheads
    g = h // hpg
    pos = tl.program_id(1) * BL + tl.arange(0, BL)
    mask_l = pos < seqlen
    i = tl.arange(0, BS)
    mask_pi = mask_l[:, None] & (i < S)[None, :]
    cc = tl.arange(0, 2 * BS)
    mask_pc = mask_l[:, None] & (cc < 2 * S)[None, :]
    th = tl.load(th_ptr + ((b * seqlen + pos[:, None]) * nheads + h) * S + i[None, :], mask=mask_pi, other=0.0)
    c, s = tl.cos(th), tl.sin(th)
    out = ((b * seqlen + pos[:, None]) * nheads + h) * N
    j = 2 * S + tl.arange(0, BR)
    mask_pj = mask_l[:, None] & (j < N)[None, :]
    if NORM:
        qe, qo, qr, _, _, _, _ = _normed(Q_ptr, qw_ptr, b, pos, g, cc, mask_pc, j, mask_pj, s_qb, s_ql, s_qg, N, S,
                                         eps, BL, BS, BR, HAS_REST)
        ke, ko, kr, _, _, _, _ = _normed(K_ptr, kw_ptr, b, pos, g, cc, mask_pc, j, mask_pj, s_kb, s_kl, s_kg, N, S,
                                         eps, BL, BS, BR, HAS_REST)
    else:
        qe, qo, ke, ko = 0.0, 0.0, 0.0, 0.0
    qe, qo, ke, ko = _with_bias(qe, qo, ke, ko, Q_ptr, K_ptr, qb_ptr, kb_ptr, b, pos, g, h, cc, mask_pc, s_qb, s_ql,
                                s_qg, s_kb, s_kl, s_kg, N, S, BL, BS, NORM)
    dtype = q_ptr.dtype.element_ty
    rqe, rqo = (qe * c - qo * s).to(dtype), (qe * s + qo * c).to(dtype)
    rke, rko = (ke * c - ko * s).to(dtype), (ke * s + ko * c).to(dtype)
    _store_pairs(q_ptr + out, cc, mask_pc, rqe, rqo, BL, BS)
    _store_pairs(k_ptr + out, cc, mask_pc, rke, rko, BL, BS)
    qk = tl.sum(rqe.to(tl.float32) * rke.to(tl.float32) + rqo.to(tl.float32) * rko.to(tl.float32), axis=1)
    if HAS_REST:
        if NORM:
            rq = (qr + tl.load(qb_ptr + h * N + j, mask=j < N, other=0.0).to(tl.float32)[None, :]).to(dtype)
            rk = (kr + tl.load(kb_ptr + h * N + j, mask=j < N, other=0.0).to(tl.float32)[None, :]).to(dtype)
        else:
            rq = _rest_tile(Q_ptr, qb_ptr, b, pos, g, h, j, mask_pj, s_qb, s_ql, s_qg, N).to(dtype)
            rk = _rest_tile(K_ptr, kb_ptr, b, pos, g, h, j, mask_pj, s_kb, s_kl, s_kg, N).to(dtype)
        tl.store(q_ptr + out + j[None, :], rq, mask=mask_pj)
        tl.store(k_ptr + out + j[None, :], rk, mask=mask_pj)
        qk += tl.sum(rq.to(tl.float32) * rk.to(tl.float32), axis=1)
    tl.store(qk_ptr + (b * seqlen + pos) * nheads + h, qk, mask=mask_l)


@triton.jit
def _rotary_bwd(Q_ptr, K_ptr, qb_ptr, kb_ptr, th_ptr, q_ptr, k_ptr, dq_ptr, dk_ptr, dqk_ptr,
                dQ_ptr, dK_ptr, dqb_ptr, dkb_ptr, dth_ptr, qw_ptr, kw_ptr, dqw_ptr, dkw_ptr,
                seqlen, nheads, hpg, N, S, eps,
                s_qb, s_ql, s_qg, s_kb, s_kl, s_kg,
                BL: tl.constexpr, BS: tl.constexpr, BR: tl.constexpr, HAS_REST: tl.constexpr, NORM: tl.constexpr):
    """One program per (batch * group, block of BL positions), looping over the group's heads: dQ, dK (batch,
    seqlen, ngroups, N) in Q's and K's dtypes (summed over the heads in float32 registers), dtheta (batch, seqlen,
    nheads, S) float32, and the bias parts (batch * nblocks, nheads, N) float32 of this block. q, k: the
    forward's rounded outputs; dq, dk: their gradients (contiguous, their layout); dqk (batch, seqlen, nheads)
    float32. NORM: Q, K are the norms' inputs (dQ, dK theirs), the weights' parts (batch * ngroups * nblocks, N)
    float32 go to dqw, dkw."""
    bg = tl.program_id(0)
    ngroups = nheads // hpg
    b = (bg // ngroups).to(tl.int64)
    g = bg % ngroups
    blk = tl.program_id(1)
    pos = blk * BL + tl.arange(0, BL)
    mask_l = pos < seqlen
    i = tl.arange(0, BS)
    mask_pi = mask_l[:, None] & (i < S)[None, :]
    cc = tl.arange(0, 2 * BS)
    mask_pc = mask_l[:, None] & (cc < 2 * S)[None, :]
    j = 2 * S + tl.arange(0, BR)
    mask_pj = mask_l[:, None] & (j < N)[None, :]
    dQe = tl.zeros((BL, BS), dtype=tl.float32)
    dQo = tl.zeros((BL, BS), dtype=tl.float32)
    dKe = tl.zeros((BL, BS), dtype=tl.float32)
    dKo = tl.zeros((BL, BS), dtype=tl.float32)
    dQr = tl.zeros((BL, BR), dtype=tl.float32)
    dKr = tl.zeros((BL, BR), dtype=tl.float32)
    part = (b * tl.num_programs(1) + blk) * nheads
    nqe, nqo, nke, nko = 0.0, 0.0, 0.0, 0.0
    if NORM:  # the group's normed rows, shared by its heads
        nqe, nqo, _, hqe, hqo, hqr, rq = _normed(Q_ptr, qw_ptr, b, pos, g, cc, mask_pc, j, mask_pj, s_qb, s_ql, s_qg,
                                                 N, S, eps, BL, BS, BR, HAS_REST)
        nke, nko, _, hke, hko, hkr, rk = _normed(K_ptr, kw_ptr, b, pos, g, cc, mask_pc, j, mask_pj, s_kb, s_kl, s_kg,
                                                 N, S, eps, BL, BS, BR, HAS_REST)
    for hh in range(hpg):
        h = g * hpg + hh
        row = (b * seqlen + pos) * nheads + h
        th = tl.load(th_ptr + row[:, None] * S + i[None, :], mask=mask_pi, other=0.0)
        c, s = tl.cos(th), tl.sin(th)
        dqk = tl.load(dqk_ptr + row, mask=mask_l, other=0.0)[:, None]
        out = row[:, None] * N
        qe, qo, ke, ko = _with_bias(nqe, nqo, nke, nko, Q_ptr, K_ptr, qb_ptr, kb_ptr, b, pos, g, h, cc, mask_pc,
                                    s_qb, s_ql, s_qg, s_kb, s_kl, s_kg, N, S, BL, BS, NORM)
        # the gradients of the rotated values: their own, plus qk's through the other factor (rounded, as used)
        dqe, dqo = _load_pairs(dq_ptr + out, cc, mask_pc, BL, BS)
        dke, dko = _load_pairs(dk_ptr + out, cc, mask_pc, BL, BS)
        rqe, rqo = _load_pairs(q_ptr + out, cc, mask_pc, BL, BS)
        rke, rko = _load_pairs(k_ptr + out, cc, mask_pc, BL, BS)
        gqe, gqo = dqe + dqk * rke, dqo + dqk * rko
        gke, gko = dke + dqk * rqe, dko + dqk * rqo
        # d theta from r = Rot(theta) x: dr_e/dtheta = -r_o, dr_o/dtheta = r_e
        dth = gqo * (qe * c - qo * s) - gqe * (qe * s + qo * c) + gko * (ke * c - ko * s) - gke * (ke * s + ko * c)
        tl.store(dth_ptr + row[:, None] * S + i[None, :], dth, mask=mask_pi)
        # Rot(-theta) of the gradients: the inputs' (with bias) gradients
        xqe, xqo = gqe * c + gqo * s, gqo * c - gqe * s
        xke, xko = gke * c + gko * s, gko * c - gke * s
        dQe += xqe
        dQo += xqo
        dKe += xke
        dKo += xko
        tl.store(dqb_ptr + (part + h) * N + 2 * i, tl.sum(xqe, axis=0), mask=i < S)
        tl.store(dqb_ptr + (part + h) * N + 2 * i + 1, tl.sum(xqo, axis=0), mask=i < S)
        tl.store(dkb_ptr + (part + h) * N + 2 * i, tl.sum(xke, axis=0), mask=i < S)
        tl.store(dkb_ptr + (part + h) * N + 2 * i + 1, tl.sum(xko, axis=0), mask=i < S)
        if HAS_REST:
            gq = tl.load(dq_ptr + out + j[None, :], mask=mask_pj, other=0.0).to(tl.float32) \
                + dqk * tl.load(k_ptr + out + j[None, :], mask=mask_pj, other=0.0).to(tl.float32)
            gk = tl.load(dk_ptr + out + j[None, :], mask=mask_pj, other=0.0).to(tl.float32) \
                + dqk * tl.load(q_ptr + out + j[None, :], mask=mask_pj, other=0.0).to(tl.float32)
            dQr += gq
            dKr += gk
            tl.store(dqb_ptr + (part + h) * N + j, tl.sum(gq, axis=0), mask=j < N)
            tl.store(dkb_ptr + (part + h) * N + j, tl.sum(gk, axis=0), mask=j < N)
    grp = ((b * seqlen + pos[:, None]) * ngroups + g) * N
    if NORM:
        wpart = (bg * tl.num_programs(1) + blk) * N
        _norm_bwd(dqw_ptr + wpart, dQe, dQo, dQr, hqe, hqo, hqr, rq, qw_ptr, dQ_ptr + grp, cc, mask_pc,
                  j, mask_pj, N, S, BL, BS, HAS_REST)
        _norm_bwd(dkw_ptr + wpart, dKe, dKo, dKr, hke, hko, hkr, rk, kw_ptr, dK_ptr + grp, cc, mask_pc,
                  j, mask_pj, N, S, BL, BS, HAS_REST)
    else:
        _store_pairs(dQ_ptr + grp, cc, mask_pc, dQe, dQo, BL, BS)
        _store_pairs(dK_ptr + grp, cc, mask_pc, dKe, dKo, BL, BS)
        if HAS_REST:
            tl.store(dQ_ptr + grp + j[None, :], dQr, mask=mask_pj)
            tl.store(dK_ptr + grp + j[None, :], dKr, mask=mask_pj)


def _sizes(Q: Tensor, theta: Tensor, norm: bool, block_l: int = BLOCK_L) -> dict:
    N, S = Q.shape[-1], theta.shape[-1]
    rest = N - 2 * S
    return dict(BL=block_l, BS=max(16, next_power_of_2(S)), BR=max(16, next_power_of_2(max(rest, 1))),
                HAS_REST=rest > 0, NORM=norm)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Q, K, Q_bias, K_bias, theta, dtype, q_weight, k_weight, eps):  # type: ignore[override]
        batch, seqlen, ngroups, N = Q.shape
        nheads = Q_bias.shape[0]
        theta = theta.float().contiguous()
        q = torch.empty(batch, seqlen, nheads, N, device=Q.device, dtype=dtype)
        k = torch.empty_like(q)
        qk = torch.empty(batch, seqlen, nheads, device=Q.device, dtype=torch.float32)
        bl, warps = NORM_FWD if q_weight is not None else (BLOCK_L, 4)
        meta = _sizes(Q, theta, q_weight is not None, bl)
        grid = (batch * nheads, cdiv(seqlen, bl))
        qw, kw = (q_weight, k_weight) if q_weight is not None else (Q_bias, K_bias)
        _rotary_fwd[grid](Q, K, Q_bias, K_bias, theta, q, k, qk, qw, kw, seqlen, nheads, nheads // ngroups, N,
                          theta.shape[-1], eps, *Q.stride()[:3], *K.stride()[:3], **meta, num_warps=warps)
        ctx.save_for_backward(Q, K, Q_bias, K_bias, theta, q, k, q_weight, k_weight)
        ctx.eps = eps
        return q, k, qk

    @staticmethod
    def backward(ctx, dq, dk, dqk):  # type: ignore[override]
        Q, K, Q_bias, K_bias, theta, q, k, q_weight, k_weight = ctx.saved_tensors
        norm = q_weight is not None
        batch, seqlen, ngroups, N = Q.shape
        nheads = Q_bias.shape[0]
        dq = torch.zeros_like(q) if dq is None else dq.contiguous()
        dk = torch.zeros_like(k) if dk is None else dk.contiguous()
        dqk = torch.zeros(q.shape[:3], device=q.device, dtype=torch.float32) if dqk is None else \
            dqk.float().contiguous()
        bl, warps = NORM_BWD if norm else (BLOCK_L, 4)
        nblocks = cdiv(seqlen, bl)
        f32 = dict(device=Q.device, dtype=torch.float32)
        # dQ, dK summed over the group's heads in float32 registers, stored once in Q's and K's dtypes
        dQ = torch.empty(batch, seqlen, ngroups, N, device=Q.device, dtype=Q.dtype)
        dK = torch.empty(batch, seqlen, ngroups, N, device=K.device, dtype=K.dtype)
        dth = torch.empty(theta.shape, **f32)
        # every entry of every (block, head) row is written by the program of the head's group
        dqb = torch.empty(batch * nblocks, nheads, N, **f32)
        dkb = torch.empty_like(dqb)
        # the norms' weight parts per (batch * group, block), every entry written
        dqw = torch.empty(batch * ngroups * nblocks, N, **f32) if norm else dqb
        dkw = torch.empty_like(dqw) if norm else dkb
        qw, kw = (q_weight, k_weight) if norm else (Q_bias, K_bias)
        _rotary_bwd[(batch * ngroups, nblocks)](
            Q, K, Q_bias, K_bias, theta, q, k, dq, dk, dqk, dQ, dK, dqb, dkb, dth, qw, kw, dqw, dkw, seqlen, nheads,
            nheads // ngroups, N, theta.shape[-1], ctx.eps, *Q.stride()[:3], *K.stride()[:3],
            **_sizes(Q, theta, norm, bl), num_warps=warps)
        dweights = (dqw.sum(0).to(q_weight.dtype), dkw.sum(0).to(k_weight.dtype)) if norm else (None, None)
        return dQ, dK, dqb.sum(0).to(Q_bias.dtype), dkb.sum(0).to(K_bias.dtype), dth, None, *dweights, None


def rotary_qk(Q: Tensor, K: Tensor, Q_bias: Tensor, K_bias: Tensor, theta: Tensor, dtype: torch.dtype,
              norm: Optional[Tuple[Tensor, Tensor, float]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Q, K: (batch, seqlen, ngroups, d_state) (last stride 1); Q_bias, K_bias: (nheads, d_state); theta: (batch,
    seqlen, nheads, n_angles). Returns q, k (batch, seqlen, nheads, d_state) in dtype, the rotated Q and K with
    bias per head, and qk (batch, seqlen, nheads) float32 their product; differentiable in every tensor input.
    norm: (q_weight, k_weight (d_state,), eps): Q and K are first RMSNorm-ed over d_state (float32, the result
    rounded to their dtype, as `mambakit.ops.norm.rms_norm` gives it)."""
    if Q.stride(-1) != 1:
        Q = Q.contiguous()
    if K.stride(-1) != 1:
        K = K.contiguous()
    q_weight, k_weight, eps = (None, None, 0.0) if norm is None else (norm[0].contiguous(), norm[1].contiguous(),
                                                                       float(norm[2]))
    return _Rotary.apply(Q, K, Q_bias.contiguous(), K_bias.contiguous(), theta, dtype, q_weight, k_weight, eps)
