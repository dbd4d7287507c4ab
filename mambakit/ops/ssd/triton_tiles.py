"""Tile helpers (``@triton.jit``) shared by the SSD kernels of `triton_fwd` and `triton_bwd`."""
from __future__ import annotations

import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers shared by the kernels. Positions are absolute (0..Lpad); a chunk is Q positions, a block BQ of them.
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _head_decay(A_ptr, h, A_LOG: tl.constexpr):
    """Head h's A (float32): read, or -exp(A_log) from A_log with A_LOG (the layer's parameter, no PyTorch kernels
    to form A)."""
    a = tl.load(A_ptr + h).to(tl.float32)
    if A_LOG:
        a = -tl.exp(a)
    return a


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


