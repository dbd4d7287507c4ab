"""Forward kernels of the chunked SSD on tensor cores (the launchers are in `mambakit.ops.ssd.triton`)."""
from __future__ import annotations

import triton
import triton.language as tl

from mambakit.ops.ssd.triton_tiles import (  # noqa: F401
    _head_decay,
    _block_positions, _load_seg, _chunk_segments, _entry_decay, _exit_decay, _chunk_head_program, _block_program,
    _key_decay, _chunk_alpha, _load_D, _load_rows, _state_tile_program, _first_state_tile,
)


# ----------------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_state_fwd(x_ptr, dt_ptr, A_ptr, ld_ptr, B_ptr, seg_ptr, acs_ptr, S_ptr,
                     seqlen, nheads, heads_per_group, P, N, nchunks, Lpad,
                     sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n,
                     HAS_SEG: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                     PREC: tl.constexpr, LOG_DECAY: tl.constexpr, A_LOG: tl.constexpr = False):
    """One program per (chunk, batch * head): the within-chunk cumsum a of dt * A (stored) and the chunk-local state
    S = sum_s exp(a_last - a_s) B_s X~_s^T, accumulated block by block and rescaled to each block's end.
    LOG_DECAY: the increments of a are read from ld_ptr (batch, nheads, Lpad) float32 instead of dt * A."""
    c, b, h, g, row = _chunk_head_program(nheads, heads_per_group, Lpad)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    A = _head_decay(A_ptr, h, A_LOG)
    seg_prev, seg_last = _chunk_segments(seg_ptr, b, c, Lpad, HAS_SEG, Q)
    S = tl.zeros((BN, BP), dtype=tl.float32)
    carry = A * 0.0  # a at the end of the previous block
    for k in range(Q // BQ):
        s, valid = _block_positions(c, k, seqlen, Q, BQ)
        dt = tl.load(dt_ptr + row + s)  # padded with zeros by the caller
        acs = carry + tl.cumsum(_increments(dt, A, ld_ptr, row, s, LOG_DECAY), axis=0)
        tl.store(acs_ptr + row + s, acs)
        a_end = tl.sum(tl.where(tl.arange(0, BQ) == BQ - 1, acs, 0.0), axis=0)
        w = _exit_decay(acs, a_end, _load_seg(seg_ptr, b, s, Lpad, HAS_SEG, BQ), seg_last, HAS_SEG)
        x = _load_rows(x_ptr, b, s, valid, h, p, P, sx_b, sx_l, sx_h, sx_p)
        Bm = _load_rows(B_ptr, b, s, valid, g, n, N, sB_b, sB_l, sB_g, sB_n)
        xw = (x.to(tl.float32) * (w * dt)[:, None]).to(Bm.dtype)
        S = S * tl.exp(a_end - carry) + tl.dot(tl.trans(Bm), xw, input_precision=PREC)  # (BN, BP)
        carry = a_end
    off = ((b * nchunks + c) * nheads + h) * P * N
    tl.store(S_ptr + off + p[None, :] * N + n[:, None], S, mask=(n < N)[:, None] & (p < P)[None, :])


@triton.jit
def _state_passing_fwd(S_ptr, acs_ptr, seg_ptr, init_ptr, H_ptr, final_ptr,
                       nheads, PN, nchunks, Lpad,
                       HAS_INIT: tl.constexpr, HAS_SEG: tl.constexpr, Q: tl.constexpr, BLOCK: tl.constexpr):
    """H_c (state entering chunk c) for every chunk, sequential over chunks, and the final state."""
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
def _increments(dt, A, ld_ptr, row, s, LOG_DECAY: tl.constexpr):
    """The log-decay of positions s: dt * A, or (LOG_DECAY) read from ld_ptr (batch, nheads, Lpad) at row + s."""
    inc = dt * A
    if LOG_DECAY:
        inc = tl.load(ld_ptr + row + s)
    return inc


@triton.jit
def _chunk_contribution(x_ptr, dt_ptr, A, ld_ptr, B_ptr, seg_ptr, acs_ptr, row, b, h, g, p, n, c, acs_mask,
                        seqlen, P, N, Lpad, sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n,
                        HAS_SEG: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                        PREC: tl.constexpr, LOG_DECAY: tl.constexpr):
    """Chunk c's part of the state pass, which does not depend on the state entering it: (decay, U) with the state
    leaving the chunk = decay * state entering + U, U (BN, BP) = sum_s exp(a_end - a_s) B_s X~_s^T, summed block by
    block of BQ positions. Stores the within-chunk cumsum a of dt * A where acs_mask."""
    U = tl.zeros((BN, BP), dtype=tl.float32)
    chunk_decay = A * 0.0 + 1.0
    carry = A * 0.0  # a at the end of the previous block of the chunk
    for k in tl.static_range(Q // BQ):
        s, valid = _block_positions(c, k, seqlen, Q, BQ)
        dt = tl.load(dt_ptr + row + s)  # padded with zeros by the caller
        acs = carry + tl.cumsum(_increments(dt, A, ld_ptr, row, s, LOG_DECAY), axis=0)
        tl.store(acs_ptr + row + s, acs, mask=acs_mask)
        a_end = tl.sum(tl.where(tl.arange(0, BQ) == BQ - 1, acs, 0.0), axis=0)
        decay = tl.exp(a_end - carry)
        w = tl.exp(a_end - acs)
        if HAS_SEG:
            seg_end = tl.load(seg_ptr + b * Lpad + c * Q + k * BQ + BQ - 1)
            seg_before = tl.load(seg_ptr + b * Lpad + tl.maximum(c * Q + k * BQ - 1, 0))
            seg_before = tl.where(c * Q + k * BQ == 0, 0, seg_before)
            w = tl.where(_load_seg(seg_ptr, b, s, Lpad, HAS_SEG, BQ) == seg_end, w, 0.0)
            decay = tl.where(seg_before == seg_end, decay, 0.0)
        x = _load_rows(x_ptr, b, s, valid, h, p, P, sx_b, sx_l, sx_h, sx_p)
        Bm = _load_rows(B_ptr, b, s, valid, g, n, N, sB_b, sB_l, sB_g, sB_n)
        xw = (x.to(tl.float32) * (w * dt)[:, None]).to(Bm.dtype)
        U = U * decay + tl.dot(tl.trans(Bm), xw, input_precision=PREC)  # (BN, BP)
        chunk_decay = chunk_decay * decay
        carry = a_end
    return chunk_decay, U


@triton.jit
def _chunk_states_fwd(x_ptr, dt_ptr, A_ptr, ld_ptr, B_ptr, seg_ptr, init_ptr, acs_ptr, H_ptr, final_ptr,
                      seqlen, nheads, heads_per_group, P, N, nchunks, Lpad,
                      sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n,
                      HAS_INIT: tl.constexpr, HAS_SEG: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr,
                      BP: tl.constexpr, BN: tl.constexpr, PAIRS: tl.constexpr, PREC: tl.constexpr,
                      LOG_DECAY: tl.constexpr, A_LOG: tl.constexpr = False):
    """One program per (batch * head, headdim block, d_state block), sequential over the chunks of the whole
    sequence: the within-chunk cumsum a of dt * A (stored), the state H_c entering every chunk (stored) and the final
    state. The state stays in registers from chunk to chunk (chunk-local states never go through memory): state <-
    decay_c state + U_c (`_chunk_contribution`). PAIRS: two chunks per step, both contributions formed before the
    two updates, so that their loads and matrix products overlap (the pass is latency-bound when programs are few)."""
    b, h, g, row, p, n, m_state, state_off = _state_tile_program(nheads, heads_per_group, P, N, Lpad, BP, BN)
    # one program per (batch, head) stores the cumsum; the others compute the same values
    first_tile = (tl.arange(0, BQ) * 0 + tl.program_id(1) + tl.program_id(2)) == 0
    A = _head_decay(A_ptr, h, A_LOG)
    state = _first_state_tile(init_ptr, (b * nheads + h) * P * N + state_off, m_state, HAS_INIT, BP, BN)
    H_off = (b * nchunks * nheads + h) * P * N + state_off
    H_chunk = b * 0 + nheads * P * N  # H's stride from chunk to chunk (int64, as b)
    for c in range(0, nchunks, 1 + PAIRS):
        decay, U = _chunk_contribution(x_ptr, dt_ptr, A, ld_ptr, B_ptr, seg_ptr, acs_ptr, row, b, h, g, p, n, c,
                                       first_tile, seqlen, P, N, Lpad, sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g,
                                       sB_n, HAS_SEG, Q, BQ, BP, BN, PREC, LOG_DECAY)
        if PAIRS:  # the second chunk of the pair, if any (else the last chunk again, its results not used)
            has_next = c + 1 < nchunks
            decay2, U2 = _chunk_contribution(x_ptr, dt_ptr, A, ld_ptr, B_ptr, seg_ptr, acs_ptr, row, b, h, g, p, n,
                                             tl.minimum(c + 1, nchunks - 1),
                                             first_tile & ((tl.arange(0, BQ) * 0 + c + 1) < nchunks),
                                             seqlen, P, N, Lpad, sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n,
                                             HAS_SEG, Q, BQ, BP, BN, PREC, LOG_DECAY)
        tl.store(H_ptr + H_off + c * H_chunk, state.to(H_ptr.dtype.element_ty), mask=m_state)
        state = state * decay + U
        if PAIRS:
            tl.store(H_ptr + H_off + (c + 1) * H_chunk, state.to(H_ptr.dtype.element_ty),
                     mask=m_state & ((state_off * 0 + c + 1) < nchunks))
            state = tl.where(has_next, state * decay2 + U2, state)
    tl.store(final_ptr + (b * nheads + h) * P * N + state_off, state, mask=m_state)


@triton.jit
def _chunk_scan_fwd(x_ptr, dt_ptr, B_ptr, C_ptr, D_ptr, seg_ptr, acs_ptr, H_ptr, y_ptr,
                    seqlen, nheads, heads_per_group, P, N, nchunks, Lpad,
                    sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                    sy_b, sy_l, sy_h, sy_p,
                    HAS_SEG: tl.constexpr, HAS_D: tl.constexpr, D_HDIM: tl.constexpr, Q: tl.constexpr,
                    BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """One program per (query block of a chunk, batch * head, headdim block): y_t for the block's positions t,
    sum over the key blocks up to it of (C_t . B_s) L[t, s] X~_s, plus exp(a_t) C_t H_c, plus D x_t."""
    c, i, b, h, t, valid_t, seg_t, seg_prev, seg_last = _block_program(seg_ptr, seqlen, nheads, Lpad, HAS_SEG, Q, BQ)
    g = h // heads_per_group
    row = (b * nheads + h) * Lpad
    p = tl.program_id(2) * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    acs_t = tl.load(acs_ptr + row + t)
    Cm = _load_rows(C_ptr, b, t, valid_t, g, n, N, sC_b, sC_l, sC_g, sC_n)
    y = tl.zeros((BQ, BP), dtype=tl.float32)
    for k in range(0, i + 1):
        s, valid_s, L = _key_decay(acs_ptr, seg_ptr, row, b, c, k, t, acs_t, seg_t, seqlen, Lpad, HAS_SEG, Q, BQ)
        dt_s = tl.load(dt_ptr + row + s)
        Bm = _load_rows(B_ptr, b, s, valid_s, g, n, N, sB_b, sB_l, sB_g, sB_n)
        x_s = _load_rows(x_ptr, b, s, valid_s, h, p, P, sx_b, sx_l, sx_h, sx_p)
        CB = tl.dot(Cm, tl.trans(Bm), input_precision=PREC)  # (BQ, BQ)
        # Causality of non-finite values: the future is masked by zeros, but 0 * nan = nan. So the mask is applied
        # after the product (a bad B_s or dt_s stays in the columns s <= t), and x's non-finite entries are zeroed
        # for the product: the first kernel made dt NaN at their positions, which reaches y_t for t >= s.
        x_s = tl.where(tl.abs(x_s) < float("inf"), x_s, tl.zeros_like(x_s))
        M = tl.where(t[:, None] >= s[None, :], CB * L * dt_s[None, :], 0.0)
        y += tl.dot(M.to(x_s.dtype), x_s, input_precision=PREC)
    off = ((b * nchunks + c) * nheads + h) * P * N
    H = tl.load(H_ptr + off + p[None, :] * N + n[:, None], mask=(n < N)[:, None] & (p < P)[None, :], other=0.0)
    e = _entry_decay(acs_t, seg_t, seg_prev, HAS_SEG)
    y += e[:, None] * tl.dot(Cm, H.to(Cm.dtype), input_precision=PREC)
    mp = valid_t[:, None] & (p < P)[None, :]
    if HAS_D:
        x_t = _load_rows(x_ptr, b, t, valid_t, h, p, P, sx_b, sx_l, sx_h, sx_p)
        y += x_t.to(tl.float32) * _load_D(D_ptr, h, p, P, D_HDIM)[None, :]
    tl.store(y_ptr + b * sy_b + t[:, None] * sy_l + h * sy_h + p[None, :] * sy_p, y.to(y_ptr.dtype.element_ty),
             mask=mp)


