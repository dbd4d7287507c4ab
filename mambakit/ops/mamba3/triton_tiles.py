"""Tile helpers shared by the Mamba-3 forward and backward kernels (SISO, and MIMO as rows (time, rank) of rank
RANK): the program's (batch, head, headdim block), one chunk's tiles, and the chunk's decays and segment masks."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _head_program(nheads, headdim, d_state, s_hb, s_hh, s_hp, s_stb, s_sth, s_stp,
                  CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The program's batch b, head h, headdim block, and the offsets / mask of its state tile in a
    (batch, nheads, headdim, d_state) tensor (h_offs) and in the per-chunk states (st_offs, without the chunk)."""
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    offs_t = tl.arange(0, CHUNK)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    mask_n = offs_n < d_state
    h_offs = b * s_hb + h * s_hh + offs_p[:, None] * s_hp + offs_n[None, :]
    h_mask = mask_p[:, None] & mask_n[None, :]
    st_offs = b * s_stb + h * s_sth + offs_p[:, None] * s_stp + offs_n[None, :]
    return b, h, pid_p, offs_t, offs_p, offs_n, mask_p, mask_n, h_offs, h_mask, st_offs


@triton.jit
def _load_chunk(q_ptr, k_ptr, v_ptr, adt_ptr, diag_ptr, b, h, c, offs_t, offs_p, offs_n, mask_p, mask_n, seqlen,
                s_qb, s_qt, s_qh, s_vb, s_vt, s_vh, s_ab, s_at, CHUNK: tl.constexpr):
    """Chunk c's tiles q, k (CHUNK, BLOCK_N), v (CHUNK, BLOCK_P), adt, diag (CHUNK,), zero past seqlen, with their
    offsets and masks."""
    t = c * CHUNK + offs_t
    mask_t = t < seqlen
    qk_offs = b * s_qb + t[:, None] * s_qt + h * s_qh + offs_n[None, :]
    qk_mask = mask_t[:, None] & mask_n[None, :]
    v_offs = b * s_vb + t[:, None] * s_vt + h * s_vh + offs_p[None, :]
    v_mask = mask_t[:, None] & mask_p[None, :]
    a_offs = b * s_ab + t * s_at + h
    q = tl.load(q_ptr + qk_offs, mask=qk_mask, other=0.0)
    k = tl.load(k_ptr + qk_offs, mask=qk_mask, other=0.0)
    v = tl.load(v_ptr + v_offs, mask=v_mask, other=0.0)
    a = tl.load(adt_ptr + a_offs, mask=mask_t, other=0.0)
    diag = tl.load(diag_ptr + a_offs, mask=mask_t, other=0.0)
    return t, mask_t, qk_offs, qk_mask, v_offs, v_mask, a_offs, q, k, v, a, diag


@triton.jit
def _chunk_decays(a, seg_ptr, b, t, mask_t, offs_t, seg_prev, s_sb, CHUNK: tl.constexpr, HAS_SEG: tl.constexpr,
                  RANK: tl.constexpr):
    """The chunk's cumulated decay acs and its total acs_last; keep (CHUNK, CHUNK): row j feeds row i inside the
    chunk (j's time step before i's, same segment; a row is a time step, or with RANK > 1 a (time, rank) pair);
    from_start: the entering state reaches the position; w: the weight exp(acs_last - acs) of each position in the
    leaving state (0 where it does not reach the chunk's end); carry: 1.0 when the entering
    state reaches the leaving one, else 0.0; seg_last: the segment at the chunk's end (seg_prev: at the end of the
    chunk before)."""
    acs = tl.cumsum(a, axis=0)
    acs_last = tl.sum(a, axis=0)
    below = (offs_t[:, None] // RANK) > (offs_t[None, :] // RANK)
    if HAS_SEG:
        seg = tl.load(seg_ptr + b * s_sb + t, mask=mask_t, other=0)
        seg_last = tl.max(tl.where(mask_t, seg, 0), axis=0)
        keep = below & (seg[:, None] == seg[None, :])
        from_start = seg == seg_prev
        to_end = seg == seg_last
        carry = tl.where(seg_last == seg_prev, 1.0, 0.0)
    else:
        seg_last = seg_prev
        keep = below
        from_start = offs_t >= 0
        to_end = offs_t >= 0
        carry = 1.0
    w = tl.where(to_end & mask_t, tl.exp(tl.where(to_end, acs_last - acs, 0.0)), 0.0)
    return acs, acs_last, keep, from_start, w, carry, seg_last


@triton.jit
def _same_step(offs_t, RANK: tl.constexpr):
    """(CHUNK, CHUNK) bool: rows i and j of a MIMO chunk (rows = (time, rank) pairs) are of the same time step."""
    return (offs_t[:, None] // RANK) == (offs_t[None, :] // RANK)
