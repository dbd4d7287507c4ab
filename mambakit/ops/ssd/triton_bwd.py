"""Backward kernels of the chunked SSD on tensor cores (the launchers are in `mambakit.ops.ssd.triton`)."""
from __future__ import annotations

import triton
import triton.language as tl

from mambakit.ops.ssd.triton_tiles import (  # noqa: F401
    _head_decay,
    _block_positions, _load_seg, _chunk_segments, _decay_tile, _entry_decay, _exit_decay, _chunk_head_program,
    _block_program, _chunk_alpha, _load_D, _load_rows, _load_state, _state_tile_program, _first_state_tile,
)
from mambakit.ops.triton.math import softplus


# ----------------------------------------------------------------------------------------------------------------------
# Backward. With X~ = dt x, T[t, s] = (dy_t . X~_s) L[t, s] (C_t . B_s) and a the within-chunk cumsum of dt A:
#   dL/da_t = e_t dy_t . (C_t H_c)                       the read-out             (from the dC kernel)
#           + rowsum_t(T) - colsum_t(T) - u_t            u_s = X~_s . (state part of dX~_s)   (from the dx kernel)
#           + [t = chunk end] (sum_s u_s + alpha-part)
# and the gradient of dt_t A is the reverse cumsum of dL/da within the chunk (`_dt_bwd`). T is formed in float32
# from float32 tiles: rounding (C B^T o L) or (dy X~^T o L) to 16 bits first would cost dA its precision.
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_read_bwd(dy_ptr, C_ptr, seg_ptr, acs_ptr, dHl_ptr,
                    seqlen, nheads, heads_per_group, P, N, nchunks, Lpad,
                    sdy_b, sdy_l, sdy_h, sdy_p, sC_b, sC_l, sC_g, sC_n,
                    HAS_SEG: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                    PREC: tl.constexpr):
    """Gradient of the state entering chunk c from that chunk's read-out: sum_t e_t C_t^T dy_t  (N, P)."""
    c, b, h, g, row = _chunk_head_program(nheads, heads_per_group, Lpad)
    p = tl.program_id(2) * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    seg_prev, seg_last = _chunk_segments(seg_ptr, b, c, Lpad, HAS_SEG, Q)
    dH = tl.zeros((BN, BP), dtype=tl.float32)
    for k in range(Q // BQ):
        t, valid = _block_positions(c, k, seqlen, Q, BQ)
        e = _entry_decay(tl.load(acs_ptr + row + t), _load_seg(seg_ptr, b, t, Lpad, HAS_SEG, BQ), seg_prev, HAS_SEG)
        Cm = _load_rows(C_ptr, b, t, valid, g, n, N, sC_b, sC_l, sC_g, sC_n)
        dy = _load_rows(dy_ptr, b, t, valid, h, p, P, sdy_b, sdy_l, sdy_h, sdy_p)
        Ce = (Cm.to(tl.float32) * e[:, None]).to(dy.dtype)
        dH += tl.dot(tl.trans(Ce), dy, input_precision=PREC)  # (BN, BP)
    off = ((b * nchunks + c) * nheads + h) * P * N
    tl.store(dHl_ptr + off + p[None, :] * N + n[:, None], dH, mask=(n < N)[:, None] & (p < P)[None, :])


@triton.jit
def _state_passing_bwd(dHl_ptr, H_ptr, acs_ptr, seg_ptr, dfinal_ptr, G_ptr, dinit_ptr, dlast_ptr,
                       nheads, PN, nchunks, Lpad, nblocks, dlast_off,
                       HAS_DFINAL: tl.constexpr, HAS_SEG: tl.constexpr, Q: tl.constexpr, BLOCK: tl.constexpr,
                       STORE_DINIT: tl.constexpr):
    """Reverse pass: G_c = gradient of the state at the END of chunk c; dinit (if STORE_DINIT); and per block the
    part of the gradient of a_last that comes through alpha (alpha * <G_c, H_c>), at dlast_ptr + dlast_off (a slice
    of a workspace)."""
    dlast_ptr += dlast_off
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
        tl.store(G_ptr + off + offs, grad.to(G_ptr.dtype.element_ty), mask=m)
        alpha = _chunk_alpha(acs_ptr, seg_ptr, b, h, c, nheads, Lpad, HAS_SEG, Q)
        H = tl.load(H_ptr + off + offs, mask=m, other=0.0)
        tl.store(dlast_ptr + ((b * nheads + h) * nchunks + c) * nblocks + blk, alpha * tl.sum(grad * H, axis=0))
        grad = alpha * grad + tl.load(dHl_ptr + off + offs, mask=m, other=0.0)
    if STORE_DINIT:
        tl.store(dinit_ptr + (b * nheads + h) * PN + offs, grad, mask=m)


@triton.jit
def _chunk_states_bwd(dy_ptr, C_ptr, seg_ptr, acs_ptr, H_ptr, dfinal_ptr, G_ptr, dinit_ptr, dlast_ptr,
                      seqlen, nheads, heads_per_group, P, N, nchunks, Lpad, dlast_off,
                      sdy_b, sdy_l, sdy_h, sdy_p, sC_b, sC_l, sC_g, sC_n,
                      HAS_DFINAL: tl.constexpr, HAS_SEG: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr,
                      BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, STORE_DINIT: tl.constexpr):
    """Reverse pass, one program per (batch * head, headdim block, d_state block), sequential over the chunks from
    the end: G_c (gradient of the state at the END of chunk c, stored), dinit (if STORE_DINIT), and per chunk this
    tile's part of the gradient of a_last that comes through alpha (alpha <G_c, H_c>). The gradient of H_c from
    chunk c's read-out, sum_t e_t C_t^T dy_t, is accumulated in registers: G_{c-1} = alpha_c G_c + that. dlast at
    dlast_ptr + dlast_off."""
    dlast_ptr += dlast_off
    b, h, g, row, p, n, m_state, state_off = _state_tile_program(nheads, heads_per_group, P, N, Lpad, BP, BN)
    tile = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
    ntiles = tl.num_programs(1) * tl.num_programs(2)
    grad = _first_state_tile(dfinal_ptr, (b * nheads + h) * P * N + state_off, m_state, HAS_DFINAL, BP, BN)
    for i in range(nchunks):
        c = nchunks - 1 - i
        off = ((b * nchunks + c) * nheads + h) * P * N
        tl.store(G_ptr + off + state_off, grad.to(G_ptr.dtype.element_ty), mask=m_state)
        H = tl.load(H_ptr + off + state_off, mask=m_state, other=0.0).to(tl.float32)
        alpha = _chunk_alpha(acs_ptr, seg_ptr, b, h, c, nheads, Lpad, HAS_SEG, Q)
        tl.store(dlast_ptr + ((b * nheads + h) * nchunks + c) * ntiles + tile,
                 alpha * tl.sum(tl.sum(grad * H, axis=1), axis=0))
        seg_prev, seg_last = _chunk_segments(seg_ptr, b, c, Lpad, HAS_SEG, Q)
        dread = tl.zeros((BN, BP), dtype=tl.float32)
        for k in tl.static_range(Q // BQ):
            t, valid = _block_positions(c, k, seqlen, Q, BQ)
            e = _entry_decay(tl.load(acs_ptr + row + t), _load_seg(seg_ptr, b, t, Lpad, HAS_SEG, BQ), seg_prev,
                             HAS_SEG)
            Cm = _load_rows(C_ptr, b, t, valid, g, n, N, sC_b, sC_l, sC_g, sC_n)
            dy = _load_rows(dy_ptr, b, t, valid, h, p, P, sdy_b, sdy_l, sdy_h, sdy_p)
            Ce = (Cm.to(tl.float32) * e[:, None]).to(dy.dtype)
            dread += tl.dot(tl.trans(Ce), dy, input_precision=PREC)  # (BN, BP)
        grad = alpha * grad + dread
    if STORE_DINIT:
        tl.store(dinit_ptr + (b * nheads + h) * P * N + state_off, grad, mask=m_state)


@triton.jit
def _chunk_dx_bwd(x_ptr, dt_ptr, B_ptr, C_ptr, D_ptr, seg_ptr, acs_ptr, G_ptr, dy_ptr,
                  dx_ptr, q_ptr, dacol_ptr, rowpart_ptr, usum_ptr, dD_ptr,
                  seqlen, nheads, heads_per_group, P, N, nchunks, Lpad, q_off, dacol_off, rowpart_off, usum_off, dD_off,
                  sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                  sdy_b, sdy_l, sdy_h, sdy_p, sdx_b, sdx_l, sdx_h, sdx_p,
                  HAS_SEG: tl.constexpr, HAS_D: tl.constexpr, D_HDIM: tl.constexpr, Q: tl.constexpr,
                  BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """One program per (key block of a chunk, batch * head): dX~_s = sum over the query blocks from it to the chunk
    end of (C_t . B_s) L[t, s] dy_t, plus w_s G_c B_s (the state it feeds). Writes dx (float32), q_s = x_s . dX~_s,
    colsum_s(T) + u_s, the rowsums of T over this block's columns for each later query block (summed by `_dt_bwd`),
    the block's sum of u_s, and with D the block's sums of dy * x. The float32 outputs at their pointers + their
    offsets (slices of one workspace)."""
    q_ptr += q_off
    dacol_ptr += dacol_off
    rowpart_ptr += rowpart_off
    usum_ptr += usum_off
    dD_ptr += dD_off
    NB: tl.constexpr = Q // BQ
    c, k, b, h, s, valid_s, seg_s, seg_prev, seg_last = _block_program(seg_ptr, seqlen, nheads, Lpad, HAS_SEG, Q, BQ)
    g = h // heads_per_group
    row = (b * nheads + h) * Lpad
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    dt_s = tl.load(dt_ptr + row + s)
    acs_s = tl.load(acs_ptr + row + s)
    Bm = _load_rows(B_ptr, b, s, valid_s, g, n, N, sB_b, sB_l, sB_g, sB_n)
    x_in = _load_rows(x_ptr, b, s, valid_s, h, p, P, sx_b, sx_l, sx_h, sx_p)
    x = x_in.to(tl.float32)
    # dt is applied to the float32 products, not to 16-bit copies of x: X~ rounded to 16 bits costs dA precision
    dxt = tl.zeros((BQ, BP), dtype=tl.float32)
    colsum = tl.zeros((BQ,), dtype=tl.float32)
    rowpart = rowpart_ptr + ((b * nheads + h) * nchunks + c) * NB * Q + k * Q
    for i in range(k, NB):
        t, valid_t = _block_positions(c, i, seqlen, Q, BQ)
        L = _decay_tile(tl.load(acs_ptr + row + t), acs_s, _load_seg(seg_ptr, b, t, Lpad, HAS_SEG, BQ), seg_s,
                        t, s, HAS_SEG)
        Cm = _load_rows(C_ptr, b, t, valid_t, g, n, N, sC_b, sC_l, sC_g, sC_n)
        dy_t = _load_rows(dy_ptr, b, t, valid_t, h, p, P, sdy_b, sdy_l, sdy_h, sdy_p)
        CBL = tl.dot(Cm, tl.trans(Bm), input_precision=PREC) * L  # (BQ_t, BQ_s)
        dxt += tl.dot(tl.trans(CBL.to(dy_t.dtype)), dy_t, input_precision=PREC)
        T = tl.dot(dy_t, tl.trans(x_in), input_precision=PREC) * (CBL * dt_s[None, :])
        colsum += tl.sum(T, axis=0)
        tl.store(rowpart + i * BQ + tl.arange(0, BQ), tl.sum(T, axis=1))
    w = _exit_decay(acs_s, tl.load(acs_ptr + row + c * Q + Q - 1), seg_s, seg_last, HAS_SEG)
    off = ((b * nchunks + c) * nheads + h) * P * N
    Gc = _load_state(G_ptr, off, p, n, P, N).to(Bm.dtype)  # (BP, BN)
    dxt_state = w[:, None] * tl.dot(Bm, tl.trans(Gc), input_precision=PREC)  # (BQ, BP)
    u = tl.sum(dxt_state * x, axis=1) * dt_s
    tl.store(dacol_ptr + row + s, colsum + u)
    tl.store(usum_ptr + (b * nheads + h) * nchunks * NB + c * NB + k, tl.sum(u, axis=0))
    dxt += dxt_state
    tl.store(q_ptr + row + s, tl.sum(dxt * x, axis=1))
    dx = dxt * dt_s[:, None]
    if HAS_D:
        dy_s = _load_rows(dy_ptr, b, s, valid_s, h, p, P, sdy_b, sdy_l, sdy_h, sdy_p).to(tl.float32)
        dx += dy_s * _load_D(D_ptr, h, p, P, D_HDIM)[None, :]
        tl.store(dD_ptr + ((b * nchunks * NB + c * NB + k) * nheads + h) * BP + p, tl.sum(dy_s * x, axis=0))
    tl.store(dx_ptr + b * sdx_b + s[:, None] * sdx_l + h * sdx_h + p[None, :] * sdx_p, dx.to(dx_ptr.dtype.element_ty),
             mask=valid_s[:, None] & (p < P)[None, :])


@triton.jit
def _chunk_dBC_bwd(x_ptr, dt_ptr, B_ptr, C_ptr, seg_ptr, acs_ptr, H_ptr, G_ptr, dy_ptr, dC_ptr, dBp_ptr, row_ptr,
                   seqlen, nheads, ngroups, heads_per_group, heads_per_split, P, N, nchunks, Lpad, dC_off, dBp_off,
                   row_off, sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                   sdy_b, sdy_l, sdy_h, sdy_p,
                   HAS_SEG: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                   PREC: tl.constexpr):
    """One program per (query block i of a chunk, batch * group). For each key block k <= i the gradient of C B^T,
    dCB[t, s] = sum over the group's heads of (dy_t . X~_s) L[t, s], is summed in registers (no atomics:
    bit-identical run after run); then dC_i += dCB B_k and dCB^T C_i is block k's part of dB from this query block
    (written to slot i of dBp; slot NB gets the state term below; the caller sums the slots). With few programs
    the heads are split over program_id(2), each split writing its own partial sums. Also the per-head
    chunk-boundary terms:
    dC_t += e_t dy_t H_c, dB_s += w_s X~_s G_c (block i), and the read-out's part of dL/da_t, e_t dy_t . (C_t H_c).
    The outputs at their pointers + their offsets (slices of one workspace)."""
    dC_ptr += dC_off
    dBp_ptr += dBp_off
    row_ptr += row_off
    NB: tl.constexpr = Q // BQ
    c, i, b, g, t, valid_t, seg_t, seg_prev, seg_last = _block_program(seg_ptr, seqlen, ngroups, Lpad, HAS_SEG, Q, BQ)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    mn_t = valid_t[:, None] & (n < N)[None, :]
    Cm = _load_rows(C_ptr, b, t, valid_t, g, n, N, sC_b, sC_l, sC_g, sC_n)
    dC = tl.zeros((BQ, BN), dtype=tl.float32)
    dB = tl.zeros((BQ, BN), dtype=tl.float32)
    split = tl.program_id(2)
    h0 = g * heads_per_group + split * heads_per_split
    dC_ptr += split.to(tl.int64) * tl.num_programs(1) * Lpad * N  # this split's (batch, Lpad, ngroups, N)
    dBp_ptr += split.to(tl.int64) * tl.num_programs(1) * Lpad * (NB + 1) * N
    for j in range(heads_per_split):
        h = h0 + j
        row = (b * nheads + h) * Lpad
        acs_t = tl.load(acs_ptr + row + t)
        dt_t = tl.load(dt_ptr + row + t)
        dy_t = _load_rows(dy_ptr, b, t, valid_t, h, p, P, sdy_b, sdy_l, sdy_h, sdy_p)
        x_t = _load_rows(x_ptr, b, t, valid_t, h, p, P, sx_b, sx_l, sx_h, sx_p)
        off = ((b * nchunks + c) * nheads + h) * P * N
        Hc = _load_state(H_ptr, off, p, n, P, N).to(Cm.dtype)  # (BP, BN)
        Gc = _load_state(G_ptr, off, p, n, P, N).to(x_t.dtype)  # (BP, BN)
        read = _entry_decay(acs_t, seg_t, seg_prev, HAS_SEG)[:, None] * tl.dot(dy_t, Hc, input_precision=PREC)
        tl.store(row_ptr + row + t, tl.sum(read * Cm.to(tl.float32), axis=1))
        dC += read
        w = _exit_decay(acs_t, tl.load(acs_ptr + row + c * Q + Q - 1), seg_t, seg_last, HAS_SEG)
        dB += (w * dt_t)[:, None] * tl.dot(x_t, Gc, input_precision=PREC)
    for k in range(0, i + 1):
        s, valid_s = _block_positions(c, k, seqlen, Q, BQ)
        seg_s = _load_seg(seg_ptr, b, s, Lpad, HAS_SEG, BQ)
        dCB = tl.zeros((BQ, BQ), dtype=tl.float32)
        for j in range(heads_per_split):
            h = h0 + j
            row = (b * nheads + h) * Lpad
            dt_s = tl.load(dt_ptr + row + s)
            x_s = _load_rows(x_ptr, b, s, valid_s, h, p, P, sx_b, sx_l, sx_h, sx_p)
            dy_t = _load_rows(dy_ptr, b, t, valid_t, h, p, P, sdy_b, sdy_l, sdy_h, sdy_p)
            L = _decay_tile(tl.load(acs_ptr + row + t), tl.load(acs_ptr + row + s), seg_t, seg_s, t, s, HAS_SEG)
            dCB += tl.dot(dy_t, tl.trans(x_s), input_precision=PREC) * (L * dt_s[None, :])
        Bm = _load_rows(B_ptr, b, s, valid_s, g, n, N, sB_b, sB_l, sB_g, sB_n)
        dC += tl.dot(dCB.to(Bm.dtype), Bm, input_precision=PREC)
        part = tl.dot(tl.trans(dCB).to(Cm.dtype), Cm, input_precision=PREC)  # (BQ_s, BN)
        tl.store(dBp_ptr + (((b * Lpad + s[:, None]) * (NB + 1) + i) * ngroups + g) * N + n[None, :], part,
                 mask=valid_s[:, None] & (n < N)[None, :])
    tl.store(dC_ptr + ((b * Lpad + t[:, None]) * ngroups + g) * N + n[None, :], dC, mask=mn_t)
    tl.store(dBp_ptr + (((b * Lpad + t[:, None]) * (NB + 1) + NB) * ngroups + g) * N + n[None, :], dB, mask=mn_t)


@triton.jit
def _dt_bwd(dt_ptr, A_ptr, row_ptr, rowpart_ptr, dacol_ptr, q_ptr, usum_ptr, dlast_ptr, ddt_ptr, dld_ptr, red_ptr,
            raw_ptr, bias_ptr, graw_ptr, dDpart_ptr, dBp_ptr, dCs_ptr, dB_ptr, dC_ptr,
            seqlen, s_rb, s_rl, s_rh, s_gb, s_gl, s_gh, lo, hi, nheads, nchunks, Lpad, ntiles, P, N, ngroups,
            heads_per_group, splits, K, row_off, rowpart_off, dacol_off, q_off, usum_off, dlast_off, red_off, dD_off,
            dBp_off, dCs_off, sdB_b, sdB_l, sdB_g, sdB_n, sdC_b, sdC_l, sdC_g, sdC_n,
            Q: tl.constexpr, BQ: tl.constexpr, RAW: tl.constexpr, HAS_BIAS: tl.constexpr,
            SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_D: tl.constexpr, D_HDIM: tl.constexpr,
            BP: tl.constexpr, BNR: tl.constexpr, LOG_DECAY: tl.constexpr, A_LOG: tl.constexpr = False):
    """One program per (chunk, batch * head): dL/da_t (see above; the chunk-end terms enter at the last
    position), its reverse cumsum r within the chunk (the gradient of dt_t * A), ddt_t = r_t A + q_t and the chunk's
    parts of dA = sum_t r_t dt_t, of the bias's gradient and of dD, into one row red[b, c] of K = 2 nheads +
    nheads * (headdim or 1) float32: [dA (nheads), dbias (nheads), dD (nheads, headdim or 1)] (one sum by the
    caller). dlast holds ntiles parts per (batch, head, chunk) (the state pass's tiles), added here in order.

    RAW: ddt is carried back through the dt processing instead of stored: the raw dt (batch, seqlen, nheads) at
    raw_ptr, v = raw + bias, the clamp's pass-through where lo <= softplus(v) <= hi, times sigmoid(v) for the
    softplus; the raw dt's gradient goes to graw_ptr (its strides, its dtype) (the same products as
    `dt_processing_grad`).

    LOG_DECAY: the increments of a were a per-position log-decay (the caller passes A = 0): r, its gradient, goes
    to dld_ptr (batch, nheads, Lpad) float32.

    Then dB and dC of the chunk's positions, summed from the dB/dC kernel's partial sums in a fixed order (no
    atomics) and written in dB_ptr's dtype with its strides: the group's heads share the (position block, state
    block) tiles of the group, the tile j of a chunk going to the group's head j mod heads_per_group. dBp: (splits,
    batch, Lpad, NB + 1, ngroups, N) float32, slot i < NB the part from query block i (read for i >= the block);
    dCs: (splits, batch, Lpad, ngroups, N). The float32 buffers at their pointers + their offsets (slices of one
    workspace)."""
    row_ptr += row_off
    rowpart_ptr += rowpart_off
    dacol_ptr += dacol_off
    q_ptr += q_off
    usum_ptr += usum_off
    dlast_ptr += dlast_off
    red_ptr += red_off
    dDpart_ptr += dD_off
    dBp_ptr += dBp_off
    dCs_ptr += dCs_off
    NB: tl.constexpr = Q // BQ
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    h = bh % nheads
    b = bh // nheads
    row = bh * Lpad
    A = _head_decay(A_ptr, h, A_LOG)
    carry = tl.load(dlast_ptr + (bh * nchunks + c) * ntiles)
    for j in range(1, ntiles):
        carry += tl.load(dlast_ptr + (bh * nchunks + c) * ntiles + j)
    for k in range(NB):
        carry += tl.load(usum_ptr + (bh * nchunks + c) * NB + k)
    dA = A * 0.0
    dbias = A * 0.0
    for kk in range(NB):
        i = NB - 1 - kk
        pos = c * Q + i * BQ + tl.arange(0, BQ)
        dt = tl.load(dt_ptr + row + pos)
        q = tl.load(q_ptr + row + pos)
        da = tl.load(row_ptr + row + pos) - tl.load(dacol_ptr + row + pos)
        for k in range(0, i + 1):  # rowsums of T over the key blocks up to this one
            da += tl.load(rowpart_ptr + ((bh * nchunks + c) * NB + k) * Q + i * BQ + tl.arange(0, BQ))
        r = carry + tl.cumsum(da, axis=0, reverse=True)
        carry += tl.sum(da, axis=0)
        g = r * A + q
        if LOG_DECAY:
            tl.store(dld_ptr + row + pos, r)
        if RAW:
            valid = pos < seqlen
            v = tl.load(raw_ptr + b * s_rb + pos * s_rl + h * s_rh, mask=valid, other=0.0).to(tl.float32)
            if HAS_BIAS:
                v += tl.load(bias_ptr + h).to(tl.float32)
            if HAS_LIMIT:
                pre = v
                if SOFTPLUS:
                    pre = softplus(v)
                g = g * ((pre >= lo) & (pre <= hi)).to(tl.float32)
            if SOFTPLUS:
                g = g * tl.sigmoid(v)
            tl.store(graw_ptr + b * s_gb + pos * s_gl + h * s_gh, g.to(graw_ptr.dtype.element_ty), mask=valid)
            dbias += tl.sum(tl.where(valid, g, 0.0), axis=0)
        else:
            tl.store(ddt_ptr + row + pos, g)
        dA += tl.sum(r * dt, axis=0)
    red = red_ptr + (b * nchunks + c) * K
    tl.store(red + h, dA * A if A_LOG else dA)  # A_LOG: the part of A_log's gradient, dA * A
    tl.store(red + nheads + h, dbias)
    if HAS_D:
        p = tl.arange(0, BP)
        dD = tl.zeros((BP,), dtype=tl.float32)
        for k in range(NB):
            dD += tl.load(dDpart_ptr + ((b * nchunks * NB + c * NB + k) * nheads + h) * BP + p)
        if D_HDIM:
            tl.store(red + 2 * nheads + h * P + p, dD, mask=p < P)
        else:
            tl.store(red + 2 * nheads + h, tl.sum(tl.where(p < P, dD, 0.0), axis=0))
    # dB, dC: this head's share of its group's tiles of the chunk
    g_ = h // heads_per_group
    nb_tiles = tl.cdiv(N, BNR)
    for tile in range(h % heads_per_group, NB * nb_tiles, heads_per_group):
        kb = tile // nb_tiles
        s = c * Q + kb * BQ + tl.arange(0, BQ)
        n = (tile % nb_tiles) * BNR + tl.arange(0, BNR)
        m = (s < seqlen)[:, None] & (n < N)[None, :]
        dB = tl.zeros((BQ, BNR), dtype=tl.float32)
        dC = tl.zeros((BQ, BNR), dtype=tl.float32)
        for sp in range(splits):
            base = (sp * (tl.num_programs(1) // nheads) + b) * Lpad + s[:, None]
            dC += tl.load(dCs_ptr + (base * ngroups + g_) * N + n[None, :], mask=m, other=0.0)
            for i in range(kb, NB + 1):
                dB += tl.load(dBp_ptr + ((base * (NB + 1) + i) * ngroups + g_) * N + n[None, :], mask=m, other=0.0)
        tl.store(dB_ptr + b * sdB_b + s[:, None] * sdB_l + g_ * sdB_g + n[None, :] * sdB_n,
                 dB.to(dB_ptr.dtype.element_ty), mask=m)
        tl.store(dC_ptr + b * sdC_b + s[:, None] * sdC_l + g_ * sdC_g + n[None, :] * sdC_n,
                 dC.to(dC_ptr.dtype.element_ty), mask=m)
