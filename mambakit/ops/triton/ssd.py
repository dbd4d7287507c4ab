"""Triton kernels of the chunked SSD (Mamba-2), forward and backward, on tensor cores.

The math is that of :func:`mambakit.ops.ssd.ssd_chunked`. Per (batch, head) the sequence is cut into chunks of ``Q``
positions. With ``a`` the within-chunk inclusive cumsum of ``dt * A`` and ``X~ = dt * x``::

    S_c      = sum_s exp(a_last - a_s) B_s X~_s^T             chunk-local state        (d_state, headdim)
    H_{c+1}  = exp(a_last) H_c + S_c                           state passing (sequential over chunks only)
    y_t      = sum_{s<=t} (C_t . B_s) exp(a_t - a_s) X~_s      intra-chunk, (C B^T o L) X~ : two matmuls
             + exp(a_t) C_t H_c                                 inter-chunk read-out       : one matmul

Chunks are long (``Q`` up to 256 positions, so that few states go through memory) and are worked on in blocks of
``BQ`` positions (the (BQ x BQ) tiles of the intra-chunk sums are looped over, as in flash attention).

Kernels (forward): ``_chunk_state_fwd`` (cumsum + S_c), ``_state_passing_fwd`` (H_c, final state),
``_chunk_scan_fwd`` (y, one program per query block). Backward: ``_chunk_read_bwd`` (gradient of H_c from the
read-out), ``_state_passing_bwd`` (reverse pass over chunks), ``_chunk_dx_bwd`` (dx per key block and head),
``_chunk_dBC_bwd`` (dC and dB per query block from the gradient of C B^T summed over the group's heads in registers:
no atomics, bit-identical gradients run after run), ``_dt_bwd`` (ddt and dA from the pieces of dL/da the
others wrote). The states that are kept (H_c at chunk starts) are O(batch * nheads * headdim * d_state * seqlen / Q).

``seq_idx`` (packed sequences) is handled by masks: a decay that crosses a sequence boundary is zero.

The kernels take the already processed dt (bias, softplus, clamp: done by the caller in PyTorch) in float32 and
return y with the D skip, without the z gate (done by the caller, so autograd handles it).
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from mambakit.ops.triton.compile import precompile_once, specialisation
from mambakit.ops.triton.device import multiprocessor_count

# Triton decides at decoration time whether a kernel is compiled or interpreted: remember which one this module got.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers shared by the kernels. Positions are absolute (0..Lpad); a chunk is Q positions, a block BQ of them.
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _block_positions(c, k, seqlen, Q: tl.constexpr, BQ: tl.constexpr):
    """Positions of block k of chunk c (BQ,) and which of them are inside the sequence."""
    pos = c * Q + k * BQ + tl.arange(0, BQ)
    return pos, pos < seqlen


@triton.jit
def _load_seg(seg_ptr, b, pos, Lpad, HAS_SEG: tl.constexpr, BQ: tl.constexpr):
    """Segment numbers at the positions pos (BQ,); zeros without packed sequences."""
    if HAS_SEG:
        return tl.load(seg_ptr + b * Lpad + pos)
    return tl.zeros((BQ,), dtype=tl.int32)


@triton.jit
def _chunk_segments(seg_ptr, b, c, Lpad, HAS_SEG: tl.constexpr, Q: tl.constexpr):
    """(segment entering chunk c = that of the previous chunk's last position, segment at the chunk's end)."""
    if HAS_SEG:
        base = seg_ptr + b * Lpad
        seg_prev = tl.where(c == 0, 0, tl.load(base + tl.maximum(c * Q - 1, 0)))
        seg_last = tl.load(base + c * Q + Q - 1)
    else:
        seg_prev = 0
        seg_last = 0
    return seg_prev, seg_last


@triton.jit
def _decay_tile(acs_t, acs_s, seg_t, seg_s, t, s, HAS_SEG: tl.constexpr):
    """L[t, s] = exp(a_t - a_s) for s <= t in the same sequence, else 0: (len(t), len(s)) float32."""
    keep = t[:, None] >= s[None, :]
    if HAS_SEG:
        keep = keep & (seg_t[:, None] == seg_s[None, :])
    return tl.exp(tl.where(keep, acs_t[:, None] - acs_s[None, :], float("-inf")))


@triton.jit
def _entry_decay(acs, seg, seg_prev, HAS_SEG: tl.constexpr):
    """e_t = exp(a_t) where t still belongs to the sequence that entered the chunk, else 0."""
    e = tl.exp(acs)
    if HAS_SEG:
        e = tl.where(seg == seg_prev, e, 0.0)
    return e


@triton.jit
def _exit_decay(acs, a_last, seg, seg_last, HAS_SEG: tl.constexpr):
    """w_s = exp(a_last - a_s) where s belongs to the chunk's last sequence, else 0."""
    w = tl.exp(a_last - acs)
    if HAS_SEG:
        w = tl.where(seg == seg_last, w, 0.0)
    return w


@triton.jit
def _chunk_head_program(nheads, heads_per_group, Lpad):
    """Program ids (chunk, batch * nheads) -> chunk c, batch b, head h, group g, and the offset of (b, h)'s row in
    the (batch, nheads, Lpad) tensors."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nheads).to(tl.int64)
    h = bh % nheads
    return c, b, h, h // heads_per_group, (b * nheads + h) * Lpad


@triton.jit
def _block_program(seg_ptr, seqlen, nsplit, Lpad, HAS_SEG: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr):
    """Program ids (chunk * NB + block, batch * nsplit) -> chunk c, block k, batch b, head-or-group j, the block's
    positions (BQ,), which are in the sequence, their segments, and the chunk's (entering, last) segments."""
    NB: tl.constexpr = Q // BQ
    c = tl.program_id(0) // NB
    k = tl.program_id(0) % NB
    b = (tl.program_id(1) // nsplit).to(tl.int64)
    j = tl.program_id(1) % nsplit
    pos, valid = _block_positions(c, k, seqlen, Q, BQ)
    seg = _load_seg(seg_ptr, b, pos, Lpad, HAS_SEG, BQ)
    seg_prev, seg_last = _chunk_segments(seg_ptr, b, c, Lpad, HAS_SEG, Q)
    return c, k, b, j, pos, valid, seg, seg_prev, seg_last


@triton.jit
def _key_decay(acs_ptr, seg_ptr, row, b, c, k, t, acs_t, seg_t, seqlen, Lpad, HAS_SEG: tl.constexpr, Q: tl.constexpr,
               BQ: tl.constexpr):
    """Key block k of chunk c seen from query positions t: its positions s (BQ,), which are in the sequence, and
    the decay tile L[t, s] (len(t), BQ)."""
    s, valid_s = _block_positions(c, k, seqlen, Q, BQ)
    L = _decay_tile(acs_t, tl.load(acs_ptr + row + s), seg_t, _load_seg(seg_ptr, b, s, Lpad, HAS_SEG, BQ), t, s,
                    HAS_SEG)
    return s, valid_s, L


@triton.jit
def _chunk_alpha(acs_ptr, seg_ptr, b, h, c, nheads, Lpad, HAS_SEG: tl.constexpr, Q: tl.constexpr):
    """Decay over the whole chunk c, exp(a_last); 0 if a sequence boundary lies in it."""
    alpha = tl.exp(tl.load(acs_ptr + (b * nheads + h) * Lpad + c * Q + Q - 1))
    if HAS_SEG:
        seg_prev, seg_last = _chunk_segments(seg_ptr, b, c, Lpad, HAS_SEG, Q)
        alpha = tl.where(seg_last == seg_prev, alpha, 0.0)
    return alpha


@triton.jit
def _load_D(D_ptr, h, p, P, D_HDIM: tl.constexpr):
    """The skip weight of head h for channels p: (BP,) float32 (D is (nheads,) or (nheads, headdim))."""
    if D_HDIM:
        return tl.load(D_ptr + h * P + p, mask=p < P, other=0.0).to(tl.float32)
    return tl.load(D_ptr + h + p * 0).to(tl.float32)


@triton.jit
def _load_rows(ptr, b, pos, valid, j, cols, ncols, s_b, s_l, s_j, s_c):
    """A (len(pos), len(cols)) tile of a (batch, seqlen, heads-or-groups, cols) tensor; zeros outside."""
    return tl.load(ptr + b * s_b + pos[:, None] * s_l + j * s_j + cols[None, :] * s_c,
                   mask=valid[:, None] & (cols < ncols)[None, :], other=0.0)


@triton.jit
def _load_state(ptr, off, p, n, P, N):
    """A (BP, BN) state tile H[p, n] from a (..., headdim, d_state) tensor at offset off."""
    return tl.load(ptr + off + p[:, None] * N + n[None, :], mask=(p < P)[:, None] & (n < N)[None, :], other=0.0)


@triton.jit
def _state_tile_program(nheads, heads_per_group, P, N, Lpad, BP: tl.constexpr, BN: tl.constexpr):
    """Program ids (batch * nheads, headdim block, d_state block) -> batch b, head h, group g, the offset of (b, h)'s
    row in the (batch, nheads, Lpad) tensors, the tile's channels p (BP,) and states n (BN,), its mask and its
    offsets in a (..., headdim, d_state) state, both (BN, BP)."""
    bh = tl.program_id(0)
    b = (bh // nheads).to(tl.int64)
    h = bh % nheads
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    n = tl.program_id(2) * BN + tl.arange(0, BN)
    mask = (n < N)[:, None] & (p < P)[None, :]
    return b, h, h // heads_per_group, (b * nheads + h) * Lpad, p, n, mask, p[None, :] * N + n[:, None]


@triton.jit
def _first_state_tile(ptr, offs, mask, PRESENT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """A (BN, BP) float32 state tile loaded at offs, or zeros if the tensor is absent."""
    if PRESENT:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.zeros((BN, BP), dtype=tl.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_state_fwd(x_ptr, dt_ptr, A_ptr, B_ptr, seg_ptr, acs_ptr, S_ptr,
                     seqlen, nheads, heads_per_group, P, N, nchunks, Lpad,
                     sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n,
                     HAS_SEG: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                     PREC: tl.constexpr):
    """One program per (chunk, batch * head): the within-chunk cumsum a of dt * A (stored) and the chunk-local state
    S = sum_s exp(a_last - a_s) B_s X~_s^T, accumulated block by block and rescaled to each block's end."""
    c, b, h, g, row = _chunk_head_program(nheads, heads_per_group, Lpad)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    A = tl.load(A_ptr + h)
    seg_prev, seg_last = _chunk_segments(seg_ptr, b, c, Lpad, HAS_SEG, Q)
    S = tl.zeros((BN, BP), dtype=tl.float32)
    carry = A * 0.0  # a at the end of the previous block
    for k in range(Q // BQ):
        s, valid = _block_positions(c, k, seqlen, Q, BQ)
        dt = tl.load(dt_ptr + row + s)  # padded with zeros by the caller
        acs = carry + tl.cumsum(dt * A, axis=0)
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
def _chunk_contribution(x_ptr, dt_ptr, A, B_ptr, seg_ptr, acs_ptr, row, b, h, g, p, n, c, acs_mask,
                        seqlen, P, N, Lpad, sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n,
                        HAS_SEG: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                        PREC: tl.constexpr):
    """Chunk c's part of the state pass, which does not depend on the state entering it: (decay, U) with the state
    leaving the chunk = decay * state entering + U, U (BN, BP) = sum_s exp(a_end - a_s) B_s X~_s^T, summed block by
    block of BQ positions. Stores the within-chunk cumsum a of dt * A where acs_mask."""
    U = tl.zeros((BN, BP), dtype=tl.float32)
    chunk_decay = A * 0.0 + 1.0
    carry = A * 0.0  # a at the end of the previous block of the chunk
    for k in tl.static_range(Q // BQ):
        s, valid = _block_positions(c, k, seqlen, Q, BQ)
        dt = tl.load(dt_ptr + row + s)  # padded with zeros by the caller
        acs = carry + tl.cumsum(dt * A, axis=0)
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
def _chunk_states_fwd(x_ptr, dt_ptr, A_ptr, B_ptr, seg_ptr, init_ptr, acs_ptr, H_ptr, final_ptr,
                      seqlen, nheads, heads_per_group, P, N, nchunks, Lpad,
                      sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n,
                      HAS_INIT: tl.constexpr, HAS_SEG: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr,
                      BP: tl.constexpr, BN: tl.constexpr, PAIRS: tl.constexpr, PREC: tl.constexpr):
    """One program per (batch * head, headdim block, d_state block), sequential over the chunks of the whole
    sequence: the within-chunk cumsum a of dt * A (stored), the state H_c entering every chunk (stored) and the final
    state. The state stays in registers from chunk to chunk (chunk-local states never go through memory): state <-
    decay_c state + U_c (`_chunk_contribution`). PAIRS: two chunks per step, both contributions formed before the
    two updates, so that their loads and matrix products overlap (the pass is latency-bound when programs are few)."""
    b, h, g, row, p, n, m_state, state_off = _state_tile_program(nheads, heads_per_group, P, N, Lpad, BP, BN)
    # one program per (batch, head) stores the cumsum; the others compute the same values
    first_tile = (tl.arange(0, BQ) * 0 + tl.program_id(1) + tl.program_id(2)) == 0
    A = tl.load(A_ptr + h)
    state = _first_state_tile(init_ptr, (b * nheads + h) * P * N + state_off, m_state, HAS_INIT, BP, BN)
    H_off = (b * nchunks * nheads + h) * P * N + state_off
    H_chunk = b * 0 + nheads * P * N  # H's stride from chunk to chunk (int64, as b)
    for c in range(0, nchunks, 1 + PAIRS):
        decay, U = _chunk_contribution(x_ptr, dt_ptr, A, B_ptr, seg_ptr, acs_ptr, row, b, h, g, p, n, c, first_tile,
                                       seqlen, P, N, Lpad, sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n,
                                       HAS_SEG, Q, BQ, BP, BN, PREC)
        if PAIRS:  # the second chunk of the pair, if any (else the last chunk again, its results not used)
            has_next = c + 1 < nchunks
            decay2, U2 = _chunk_contribution(x_ptr, dt_ptr, A, B_ptr, seg_ptr, acs_ptr, row, b, h, g, p, n,
                                             tl.minimum(c + 1, nchunks - 1),
                                             first_tile & ((tl.arange(0, BQ) * 0 + c + 1) < nchunks),
                                             seqlen, P, N, Lpad, sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n,
                                             HAS_SEG, Q, BQ, BP, BN, PREC)
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
        y += tl.dot((CB * L * dt_s[None, :]).to(x_s.dtype), x_s, input_precision=PREC)
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
        tl.store(G_ptr + off + offs, grad.to(G_ptr.dtype.element_ty), mask=m)
        alpha = _chunk_alpha(acs_ptr, seg_ptr, b, h, c, nheads, Lpad, HAS_SEG, Q)
        H = tl.load(H_ptr + off + offs, mask=m, other=0.0)
        tl.store(dlast_ptr + ((b * nheads + h) * nchunks + c) * nblocks + blk, alpha * tl.sum(grad * H, axis=0))
        grad = alpha * grad + tl.load(dHl_ptr + off + offs, mask=m, other=0.0)
    tl.store(dinit_ptr + (b * nheads + h) * PN + offs, grad, mask=m)


@triton.jit
def _chunk_states_bwd(dy_ptr, C_ptr, seg_ptr, acs_ptr, H_ptr, dfinal_ptr, G_ptr, dinit_ptr, dlast_ptr,
                      seqlen, nheads, heads_per_group, P, N, nchunks, Lpad,
                      sdy_b, sdy_l, sdy_h, sdy_p, sC_b, sC_l, sC_g, sC_n,
                      HAS_DFINAL: tl.constexpr, HAS_SEG: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr,
                      BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Reverse pass, one program per (batch * head, headdim block, d_state block), sequential over the chunks from
    the end: G_c (gradient of the state at the END of chunk c, stored), dinit, and per chunk this tile's part of the
    gradient of a_last that comes through alpha (alpha <G_c, H_c>). The gradient of H_c from chunk c's read-out,
    sum_t e_t C_t^T dy_t, is accumulated in registers: G_{c-1} = alpha_c G_c + that."""
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
    tl.store(dinit_ptr + (b * nheads + h) * P * N + state_off, grad, mask=m_state)


@triton.jit
def _chunk_dx_bwd(x_ptr, dt_ptr, B_ptr, C_ptr, D_ptr, seg_ptr, acs_ptr, G_ptr, dy_ptr,
                  dx_ptr, q_ptr, dacol_ptr, rowpart_ptr, usum_ptr, dD_ptr,
                  seqlen, nheads, heads_per_group, P, N, nchunks, Lpad,
                  sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                  sdy_b, sdy_l, sdy_h, sdy_p, sdx_b, sdx_l, sdx_h, sdx_p,
                  HAS_SEG: tl.constexpr, HAS_D: tl.constexpr, D_HDIM: tl.constexpr, Q: tl.constexpr,
                  BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """One program per (key block of a chunk, batch * head): dX~_s = sum over the query blocks from it to the chunk
    end of (C_t . B_s) L[t, s] dy_t, plus w_s G_c B_s (the state it feeds). Writes dx (float32), q_s = x_s . dX~_s,
    colsum_s(T) + u_s, the rowsums of T over this block's columns for each later query block (summed by `_dt_bwd`),
    the block's sum of u_s, and with D the block's sums of dy * x."""
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
                   seqlen, nheads, ngroups, heads_per_group, heads_per_split, P, N, nchunks, Lpad,
                   sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, sC_b, sC_l, sC_g, sC_n,
                   sdy_b, sdy_l, sdy_h, sdy_p,
                   HAS_SEG: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                   PREC: tl.constexpr):
    """One program per (query block i of a chunk, batch * group). For each key block k <= i the gradient of C B^T,
    dCB[t, s] = sum over the group's heads of (dy_t . X~_s) L[t, s], is summed in registers (no atomics:
    bit-identical run after run); then dC_i += dCB B_k and dCB^T C_i is block k's part of dB from this query block
    (written to slot i of dBp; slot NB gets the state term below; the caller sums the slots). With few programs
    the heads are split over program_id(2), each split writing its own partial sums. Also the per-head
    chunk-boundary terms:
    dC_t += e_t dy_t H_c, dB_s += w_s X~_s G_c (block i), and the read-out's part of dL/da_t, e_t dy_t . (C_t H_c)."""
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
def _dt_bwd(dt_ptr, A_ptr, row_ptr, rowpart_ptr, dacol_ptr, q_ptr, usum_ptr, dlast_ptr, ddt_ptr, dA_ptr,
            nheads, nchunks, Lpad, Q: tl.constexpr, BQ: tl.constexpr):
    """One program per (chunk, batch * head): dL/da_t (see above; the chunk-end terms enter at the last
    position), its reverse cumsum r within the chunk (the gradient of dt_t * A), ddt_t = r_t A + q_t and the chunk's
    part of dA = sum_t r_t dt_t."""
    NB: tl.constexpr = Q // BQ
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    h = bh % nheads
    row = bh * Lpad
    A = tl.load(A_ptr + h)
    carry = tl.load(dlast_ptr + bh * nchunks + c)
    for k in range(NB):
        carry += tl.load(usum_ptr + (bh * nchunks + c) * NB + k)
    dA = A * 0.0
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
        tl.store(ddt_ptr + row + pos, r * A + q)
        dA += tl.sum(r * dt, axis=0)
    tl.store(dA_ptr + bh * nchunks + c, dA)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def _pow2(v: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(v))


#: Upper bounds on the chunk (positions whose states are not stored: larger chunks move fewer states through memory
#: but do more intra-chunk work) and on the block (positions per tile). None: the defaults chosen in `_Plan`.
MAX_CHUNK: int = 128
MAX_BLOCK: Optional[int] = None
#: float32 inputs keep short chunks: the reverse cumsum of dL/da over a chunk cancels large terms, and on an H100 dA
#: lost float32 precision with 64-position chunks (1.05e-5 relative on a packed case; <= 2.5e-6 with 32).
MAX_CHUNK_FP32: int = 32
#: The states H_c entering the chunks (and, backward, their gradients): one sequential pass over the sequence per
#: (batch, head, state tile) that keeps the state in registers (True), or the chunk-local states written to memory
#: and passed along by a separate kernel (False). None: the pass when there are (batch, head) pairs enough to
#: fill half the GPU's multiprocessors (H100 sweep: at 65536 tokens it is 15-25 % faster forward from 1K to 16K,
#: but 1.6x slower at batch 1 x 64K, 32 pairs).
FUSED_STATES: Optional[bool] = None
#: (headdim, d_state) tile of that pass; None: `_Plan.state_tiles` picks it.
STATE_TILE: Optional[Tuple[int, int]] = None
#: Two chunks per step of that pass (forward); None: `_Plan.pairs` decides.
STATE_PAIRS: Optional[bool] = None
#: Positions per step of that pass, 16-bit inputs (H100: whole 128-position chunks were 2-10 % faster than 64-blocks).
MAX_STATE_BLOCK: int = 128


def _block_len(d_state: int, headdim: int, chunk_size: int, itemsize: int) -> int:
    """Positions per tile: a power of two in [16, chunk_size] small enough for the (BQ x BQ) and (BQ x d_state)
    tiles to fit in registers and shared memory. float32 tiles take twice the room of 16-bit ones."""
    cap = 64 if max(d_state, headdim) <= 128 else 32
    if itemsize > 2:
        cap //= 2
    if MAX_BLOCK is not None:
        cap = min(cap, MAX_BLOCK)
    q = 16
    while q * 2 <= min(cap, chunk_size):
        q *= 2
    return q


def _chunk_len(block: int, chunk_size: int, itemsize: int) -> int:
    """Positions per chunk: the largest power of two <= min(chunk_size, MAX_CHUNK), a multiple of the block (the
    result does not depend on it: chunking only reorders the sums); at most MAX_CHUNK_FP32 for float32."""
    cap = min(chunk_size, MAX_CHUNK, MAX_CHUNK_FP32 if itemsize > 2 else MAX_CHUNK)
    q = block
    while q * 2 <= cap:
        q *= 2
    return q


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _dt_prepare(dt_ptr, bias_ptr, out_ptr, seqlen, nheads, Lpad, s_b, s_l, s_h, lo, hi,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (batch * head, block of positions): dt (batch, seqlen, nheads), any float dtype -> (batch,
    nheads, Lpad) float32: + bias, softplus (x past 20), clamp to [lo, hi]; 0 past seqlen."""
    bh = tl.program_id(0)
    b = (bh // nheads).to(tl.int64)
    h = bh % nheads
    pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = pos < seqlen
    v = tl.load(dt_ptr + b * s_b + pos * s_l + h * s_h, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:  # log1p(e^v) as log(u) e / (u - 1), u = 1 + e^v: accurate where e^v is tiny
        e = tl.exp(tl.minimum(v, 20.0))
        u = 1.0 + e
        v = tl.where(v > 20.0, v, tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0)))
    if HAS_LIMIT:
        v = tl.minimum(tl.maximum(v, lo), hi)
    tl.store(out_ptr + (b * nheads + h) * Lpad + pos, tl.where(valid, v, 0.0), mask=pos < Lpad)


def _prepare_dt(dt: Tensor, bias: Optional[Tensor], softplus: bool, limit: Optional[Tuple[float, float]],
                Lpad: int) -> Tensor:
    """dt (batch, seqlen, nheads) -> (batch, nheads, Lpad) float32, processed as the official kernels do (bias,
    softplus, clamp to limit where given) and zero-padded, in one kernel."""
    batch, seqlen, nheads = dt.shape
    out = torch.empty((batch, nheads, Lpad), device=dt.device, dtype=torch.float32)
    BLOCK = 1024
    lo, hi = limit if limit is not None else (0.0, 0.0)
    _dt_prepare[batch * nheads, triton.cdiv(Lpad, BLOCK)](
        dt, bias if bias is not None else dt, out, seqlen, nheads, Lpad, *dt.stride(), float(lo), float(hi),
        HAS_BIAS=bias is not None, SOFTPLUS=softplus, HAS_LIMIT=limit is not None, BLOCK=BLOCK, num_warps=4)
    return out


def _dt_processing_grad(ddt: Tensor, dt: Tensor, bias: Optional[Tensor], softplus: bool,
                        limit: Optional[Tuple[float, float]]) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients of the raw dt (its dtype) and of the bias from that of the processed dt, ddt (batch, seqlen,
    nheads) float32 (what autograd gives the PyTorch form of `_prepare_dt`, `mambakit.ops.ssd._process_dt`: clamp
    passes where lo <= v <= hi). Written out: autograd through `_process_dt` cost 0.04-0.06 ms more per
    forward+backward (H100, 65536 tokens)."""
    v = dt.float() + bias.float() if bias is not None else dt.float()
    if limit is not None:
        pre = F.softplus(v) if softplus else v
        ddt = ddt * ((pre >= limit[0]) & (pre <= limit[1]))
    if softplus:
        ddt = ddt * torch.sigmoid(v)
    return ddt.to(dt.dtype), (ddt.sum((0, 1)).to(bias.dtype) if bias is not None else None)


def _padded_segments(seg: Optional[Tensor], Lpad: int) -> Optional[Tensor]:
    if seg is None:
        return None
    out = seg[:, -1:].expand(seg.shape[0], Lpad).to(torch.int32).clone()
    out[:, : seg.shape[1]] = seg
    return out.contiguous()


class _Plan:
    """Shapes and launch parameters shared by forward and backward."""

    def __init__(self, x: Tensor, B: Tensor, chunk_size: int) -> None:
        self.batch, self.seqlen, self.nheads, self.P = x.shape
        self.ngroups, self.N = B.shape[2], B.shape[3]
        self.hpg = self.nheads // self.ngroups
        self.BQ = _block_len(self.N, self.P, chunk_size, x.element_size())
        self.Q = _chunk_len(self.BQ, chunk_size, x.element_size())
        self.NB = self.Q // self.BQ
        # float32 keeps its short blocks there too: dA is ill-conditioned (see MAX_CHUNK_FP32)
        self.state_block = self.BQ if x.element_size() > 2 else min(self.Q, MAX_STATE_BLOCK)
        self.nchunks = -(-self.seqlen // self.Q)
        self.Lpad = self.nchunks * self.Q
        self.BP, self.BN = _pow2(self.P), _pow2(self.N)
        self.prec = _precision(x.dtype)
        self.sixteen_bit = x.element_size() == 2
        self.PN = self.P * self.N
        self.BLOCK = min(1024, triton.next_power_of_2(self.PN))
        self.nblocks = triton.cdiv(self.PN, self.BLOCK)
        # H100 sweep (benchmarks/sweep_ssd.py): 4 warps at d_state 64 and 128 (8 is 1.5-2x slower), 2 stages
        self.stages = 2 if x.element_size() == 2 else 1
        self.warps = 4

    def fused_states(self, device: torch.device) -> bool:
        if FUSED_STATES is not None:
            return FUSED_STATES
        return self.batch * self.nheads >= multiprocessor_count(device) // 2

    def pairs(self, device: torch.device) -> bool:
        """Two chunks per step of the forward state pass (`_chunk_states_fwd`): for 16-bit inputs (whole chunks per
        step). H100, bf16, 65536 tokens: 0.78 -> 0.75 ms forward at d_state 64, 16K (0.72 -> 0.69 with 32x64 tiles),
        0.97 -> 0.93 at d_state 128; equal at 2K. float32 keeps single chunks (not measured)."""
        if STATE_PAIRS is not None:
            return STATE_PAIRS
        return self.sixteen_bit

    def state_tiles(self, device: torch.device) -> Tuple[int, int]:
        """(headdim, d_state) tile of `_chunk_states_fwd` / `_chunk_states_bwd`: one program per (batch, head, tile)
        runs through the whole sequence, so with few (batch, head) pairs the state is cut into tiles until there are
        programs enough to fill the GPU (one per multiprocessor). headdim is cut first: its tiles share the B and C
        tiles, which all the heads of a group read anyway. (H100, bf16, d_state 64, 16K x 4: 128 programs of 64x64
        0.75 ms forward, 256 of 32x64 0.69.)"""
        if STATE_TILE is not None:
            return STATE_TILE
        sms = multiprocessor_count(device)
        bp, bn = min(self.BP, 64), min(self.BN, 64)
        while self.batch * self.nheads * triton.cdiv(self.P, bp) * triton.cdiv(self.N, bn) < sms \
                and max(bp, bn) > 16:
            if bp > 16:
                bp //= 2
            else:
                bn //= 2
        return bp, bn

    def head_splits(self, target_programs: int = 1024) -> int:
        """`_chunk_dBC_bwd` sums over a group's heads in registers, one program per (block, batch, group): with
        fewer programs than the GPU holds (a Mamba-2 LM: batch 8 x 2048, one group: 256) the heads are split over
        this many programs (a power of two dividing heads_per_group)."""
        programs = self.nchunks * self.NB * self.batch * self.ngroups
        splits = 1
        while self.hpg % (splits * 2) == 0 and programs * splits < target_programs:
            splits *= 2
        return splits


def ssd_forward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                initial_states: Optional[Tensor], seg: Optional[Tensor], chunk_size: int,
                dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                dt_limit: Optional[Tuple[float, float]] = None) -> Tuple[Tensor, Tensor, Tuple[Tensor, ...]]:
    """x: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads), processed here (+ dt_bias (nheads,),
    softplus, clamp to dt_limit where given); A: (nheads,) float32;
    B, C: (batch, seqlen, ngroups, d_state); D: (nheads,) or (nheads, headdim) float32 or None; initial_states:
    (batch, nheads, headdim, d_state) or None; seg: (batch, seqlen) segment numbers or None. x, B, C share one dtype.
    chunk_size: upper bound of the chunk.

    Returns y (x's layout and dtype, with D * x, without the gate), the final state (float32) and what the backward
    needs."""
    pl = _Plan(x, B, chunk_size)
    dev = x.device
    dtp = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, pl.Lpad)
    segp = _padded_segments(seg, pl.Lpad)
    has_seg = segp is not None
    segp_arg = segp if has_seg else dtp
    acs = torch.empty_like(dtp)
    H = torch.empty((pl.batch, pl.nchunks, pl.nheads, pl.P, pl.N), device=dev,
                    dtype=x.dtype if x.element_size() == 2 else torch.float32)
    final = torch.empty((pl.batch, pl.nheads, pl.P, pl.N), device=dev, dtype=torch.float32)
    init = initial_states.float().contiguous() if initial_states is not None else final
    if pl.fused_states(dev):
        BPs, BNs = pl.state_tiles(dev)
        _chunk_states_fwd[pl.batch * pl.nheads, triton.cdiv(pl.P, BPs), triton.cdiv(pl.N, BNs)](
            x, dtp, A, B, segp_arg, init, acs, H, final, pl.seqlen, pl.nheads, pl.hpg, pl.P, pl.N, pl.nchunks,
            pl.Lpad, *x.stride(), *B.stride(), HAS_INIT=initial_states is not None, HAS_SEG=has_seg, Q=pl.Q,
            BQ=pl.state_block, BP=BPs, BN=BNs, PAIRS=pl.pairs(dev), PREC=pl.prec, num_warps=pl.warps,
            num_stages=pl.stages)
    else:
        S = torch.empty((pl.batch, pl.nchunks, pl.nheads, pl.P, pl.N), device=dev, dtype=torch.float32)
        _chunk_state_fwd[pl.nchunks, pl.batch * pl.nheads](
            x, dtp, A, B, segp_arg, acs, S, pl.seqlen, pl.nheads, pl.hpg, pl.P, pl.N, pl.nchunks, pl.Lpad,
            *x.stride(), *B.stride(), HAS_SEG=has_seg, Q=pl.Q, BQ=pl.BQ, BP=pl.BP, BN=pl.BN, PREC=pl.prec,
            num_warps=pl.warps, num_stages=pl.stages)
        _state_passing_fwd[pl.batch * pl.nheads, pl.nblocks](
            S, acs, segp_arg, init, H, final, pl.nheads, pl.PN, pl.nchunks, pl.Lpad,
            HAS_INIT=initial_states is not None, HAS_SEG=has_seg, Q=pl.Q, BLOCK=pl.BLOCK, num_warps=4)
        del S
    y = torch.empty_like(x)
    BPy = min(pl.BP, 64)
    _chunk_scan_fwd[pl.nchunks * pl.NB, pl.batch * pl.nheads, triton.cdiv(pl.P, BPy)](
        x, dtp, B, C, D if D is not None else dtp, segp_arg, acs, H, y, pl.seqlen, pl.nheads, pl.hpg, pl.P, pl.N,
        pl.nchunks, pl.Lpad, *x.stride(), *B.stride(), *C.stride(), *y.stride(), HAS_SEG=has_seg,
        HAS_D=D is not None, D_HDIM=D is not None and D.dim() == 2, Q=pl.Q, BQ=pl.BQ, BP=BPy, BN=pl.BN,
        PREC=pl.prec, num_warps=pl.warps, num_stages=pl.stages)
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
    common = dict(HAS_SEG=has_seg, Q=pl.Q, BQ=pl.BQ, BN=pl.BN, PREC=pl.prec, num_warps=pl.warps,
                  num_stages=pl.stages)
    G = torch.empty_like(H)  # input dtype for 16-bit inputs like H: every reader rounds it to that dtype anyway
    dinit = torch.empty((pl.batch, pl.nheads, pl.P, pl.N), device=dev, dtype=torch.float32)
    dfin = dfinal.float().contiguous() if dfinal is not None else dinit
    if pl.fused_states(dev):
        BPs, BNs = pl.state_tiles(dev)
        grid = (pl.batch * pl.nheads, triton.cdiv(pl.P, BPs), triton.cdiv(pl.N, BNs))
        dlast = torch.empty((pl.batch, pl.nheads, pl.nchunks, grid[1] * grid[2]), device=dev, dtype=torch.float32)
        _chunk_states_bwd[grid](
            dy, C, segp_arg, acs, H, dfin, G, dinit, dlast, pl.seqlen, pl.nheads, pl.hpg, pl.P, pl.N, pl.nchunks,
            pl.Lpad, *dy.stride(), *C.stride(), HAS_DFINAL=dfinal is not None, HAS_SEG=has_seg, Q=pl.Q,
            BQ=pl.state_block, BP=BPs, BN=BNs, PREC=pl.prec, num_warps=pl.warps, num_stages=pl.stages)
    else:
        dHl = torch.empty_like(H, dtype=torch.float32)
        BPy = min(pl.BP, 64)
        _chunk_read_bwd[pl.nchunks, pl.batch * pl.nheads, triton.cdiv(pl.P, BPy)](
            dy, C, segp_arg, acs, dHl, pl.seqlen, pl.nheads, pl.hpg, pl.P, pl.N, pl.nchunks, pl.Lpad,
            *dy.stride(), *C.stride(), BP=BPy, **common)
        dlast = torch.empty((pl.batch, pl.nheads, pl.nchunks, pl.nblocks), device=dev, dtype=torch.float32)
        _state_passing_bwd[pl.batch * pl.nheads, pl.nblocks](
            dHl, H, acs, segp_arg, dfin, G, dinit, dlast, pl.nheads, pl.PN, pl.nchunks, pl.Lpad, pl.nblocks,
            HAS_DFINAL=dfinal is not None, HAS_SEG=has_seg, Q=pl.Q, BLOCK=pl.BLOCK, num_warps=4)
        del dHl
    dlast = dlast.sum(-1) if dlast.shape[-1] > 1 else dlast[..., 0].contiguous()

    dx = torch.empty(x.shape, device=dev, dtype=x.dtype)  # accumulated in float32, rounded once on the way out
    q = torch.empty_like(dtp)
    dacol = torch.empty_like(dtp)
    rowpart = torch.empty((pl.batch, pl.nheads, pl.nchunks, pl.NB, pl.Q), device=dev, dtype=torch.float32)
    usum = torch.empty((pl.batch, pl.nheads, pl.nchunks * pl.NB), device=dev, dtype=torch.float32)
    dD_part = torch.empty((pl.batch, pl.nchunks * pl.NB, pl.nheads, pl.BP), device=dev, dtype=torch.float32) \
        if D is not None else usum
    _chunk_dx_bwd[pl.nchunks * pl.NB, pl.batch * pl.nheads](
        x, dtp, B, C, D if D is not None else dtp, segp_arg, acs, G, dy, dx, q, dacol, rowpart, usum, dD_part,
        pl.seqlen, pl.nheads, pl.hpg, pl.P, pl.N, pl.nchunks, pl.Lpad,
        *x.stride(), *B.stride(), *C.stride(), *dy.stride(), *dx.stride(), HAS_D=D is not None,
        D_HDIM=D is not None and D.dim() == 2, BP=pl.BP, **common)
    row = torch.empty_like(dtp)
    # slot i < NB of dBp: the part of dB from query block i (zeros where i precedes the key block); slot NB: the
    # state term. Partial sums per head split, added in a fixed order: deterministic.
    splits = pl.head_splits()
    dC = torch.empty((splits, pl.batch, pl.Lpad, pl.ngroups, pl.N), device=dev, dtype=torch.float32)
    dBp = torch.zeros((splits, pl.batch, pl.Lpad, pl.NB + 1, pl.ngroups, pl.N), device=dev, dtype=torch.float32)
    _chunk_dBC_bwd[pl.nchunks * pl.NB, pl.batch * pl.ngroups, splits](
        x, dtp, B, C, segp_arg, acs, H, G, dy, dC, dBp, row, pl.seqlen, pl.nheads, pl.ngroups, pl.hpg,
        pl.hpg // splits, pl.P, pl.N, pl.nchunks, pl.Lpad, *x.stride(), *B.stride(), *C.stride(), *dy.stride(),
        BP=pl.BP, **common)
    dB = dBp.sum((0, 3))
    dC = dC[0] if splits == 1 else dC.sum(0)
    ddt = torch.empty_like(dtp)
    dA_part = torch.empty((pl.batch, pl.nheads, pl.nchunks), device=dev, dtype=torch.float32)
    _dt_bwd[pl.nchunks, pl.batch * pl.nheads](
        dtp, A, row, rowpart, dacol, q, usum, dlast, ddt, dA_part, pl.nheads, pl.nchunks, pl.Lpad, Q=pl.Q, BQ=pl.BQ,
        num_warps=1)
    ddt = ddt[:, :, : pl.seqlen].transpose(1, 2)
    dD = None
    if D is not None:
        dD = dD_part.sum(dim=(0, 1))[:, : pl.P]
        dD = dD if D.dim() == 2 else dD.sum(-1)
    return dx, ddt, dA_part.sum(dim=(0, 2)), dB[:, : pl.seqlen], dC[:, : pl.seqlen], dD, dinit


# ----------------------------------------------------------------------------------------------------------------------
# First call: compile every kernel of forward and backward at once, in child processes (mambakit.ops.triton.compile)
# ----------------------------------------------------------------------------------------------------------------------


def _config_key(x: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], has_init: bool, seg: Optional[Tensor],
                chunk_size: int, *more: Tensor) -> tuple:
    """What decides which kernel specialisations a call launches: dtypes, head and state sizes, the options, and
    what Triton specialises on of the lengths, strides and addresses."""
    return (x.dtype, x.shape[2:], B.shape[2:], None if D is None else D.dim(), has_init, seg is None, chunk_size,
            x.device, specialisation(x.shape[0], x.shape[1], -(-x.shape[1] // chunk_size), x, B, C, *more))


# ----------------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------------


class _SSDTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_states, seg, chunk_size, dt_bias, dt_softplus,  # type: ignore[override]
                dt_limit):
        processing = (dt_bias, dt_softplus, dt_limit)

        def first_call() -> None:  # forward and backward (the upstream gradients guessed: contiguous, materialised)
            y, final, saved = ssd_forward(x, dt, A, B, C, D, initial_states, seg, chunk_size, *processing)
            ssd_backward(x, A, B, C, D, saved, torch.empty_like(y), torch.empty_like(final), chunk_size)

        key = _config_key(x, B, C, D, initial_states is not None, seg, chunk_size, dt) + (
            dt_bias is not None, dt_softplus, dt_limit is not None)
        precompile_once(("forward",) + key, first_call)
        y, final, saved = ssd_forward(x, dt, A, B, C, D, initial_states, seg, chunk_size, *processing)
        dtp, segp, acs, H = saved
        ctx.save_for_backward(x, A, B, C, D, dtp, acs, H, segp, dt, dt_bias)
        ctx.chunk_size = chunk_size
        ctx.has_init = initial_states is not None
        ctx.dt_softplus, ctx.dt_limit = dt_softplus, dt_limit
        return y, final

    @staticmethod
    def backward(ctx, gy, gfinal):  # type: ignore[override]
        x, A, B, C, D, dtp, acs, H, segp, dt, dt_bias = ctx.saved_tensors
        dy = gy if gy is not None else torch.zeros_like(x)
        # the real upstream gradients may specialise the backward kernels otherwise than forward's guess
        key = _config_key(x, B, C, D, ctx.has_init, segp, ctx.chunk_size, dy)
        precompile_once(("backward", dy.dtype, gfinal is None) + key,
                        lambda: ssd_backward(x, A, B, C, D, (dtp, segp, acs, H), dy, gfinal, ctx.chunk_size))
        dx, ddt, dA, dB, dC, dD, dinit = ssd_backward(x, A, B, C, D, (dtp, segp, acs, H), dy, gfinal,
                                                      ctx.chunk_size)
        ddt, dbias = _dt_processing_grad(ddt, dt, dt_bias, ctx.dt_softplus, ctx.dt_limit)
        return (dx.to(x.dtype), ddt, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dinit if ctx.has_init else None,
                None, None, dbias, None, None)


def ssd_triton_core(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                    initial_states: Optional[Tensor], seg: Optional[Tensor], chunk_size: int,
                    dt_bias: Optional[Tensor] = None, dt_softplus: bool = False,
                    dt_limit: Optional[Tuple[float, float]] = None) -> Tuple[Tensor, Tensor]:
    """Differentiable SSD core with the D skip, without the gate. x: (batch, seqlen, nheads, headdim)
    float16/bfloat16/float32; dt: (batch, seqlen, nheads), processed in the first kernel (+ dt_bias (nheads,),
    softplus, clamp to dt_limit where given); B, C are cast to x's dtype; D: (nheads,) or (nheads, headdim) or None.
    Returns y (x's dtype) and the final state (float32)."""
    io = x.dtype
    init = None if initial_states is None else initial_states.float()
    Df = None if D is None else D.float().contiguous()
    return _SSDTriton.apply(x, dt, A.float().contiguous(), B.to(io), C.to(io), Df, init, seg, chunk_size, dt_bias,
                            dt_softplus, dt_limit)
