"""The backward kernel of the Mamba-3 Triton scans, SISO and MIMO (the launcher and the autograd function are in
:mod:`mambakit.ops.mamba3.triton`).

It mirrors the forward: one program per (batch, head, block of headdim) walks the chunks in reverse, keeping the
gradient of the state (headdim block, d_state) in registers and reading the state that entered each chunk from the
forward's saved copy. Per chunk, with e_i = exp(acs_i), dP = dy v^T, dS the gradient of the state after the chunk::

    dscores = keep * decay * dP            dq = dscores k + fs * e * (dy S),  dk = dscores^T q + w * (v dS)
    dv = mix^T dy + diag * dy + w * (k dS^T)        ddiag_i = dy_i . v_i
    dS_before = carry * exp(acs_last) * dS + (fs * e * dy)^T q

The gradients of q, k, adt and diag sum over headdim: each headdim block writes its own partial sums (a leading
block axis) and the caller adds them up, so nothing is accumulated with atomics and the result is bit-identical
from run to run. float32 accumulation, IEEE dots.

MIMO (RANK > 1, rows = (time, rank) pairs): the rows of one time step also meet through own = same * (q kg^T),
so dq += (same * dP) kg, dkg = (same * dP)^T q and dv += own^T dy.
"""
from __future__ import annotations

import triton
import triton.language as tl

from mambakit.ops.mamba3.triton_tiles import _chunk_decays, _head_program, _load_chunk, _same_step


@triton.jit
def _mamba3_bwd_kernel(
    q_ptr, k_ptr, v_ptr, adt_ptr, diag_ptr, seg_ptr, st_ptr, dy_ptr, dhT_ptr,
    dq_ptr, dk_ptr, dv_ptr, dadt_ptr, ddiag_ptr, dh0_ptr, kg_ptr, dkg_ptr,
    seqlen, nheads, headdim, d_state, nchunks,
    s_qb, s_qt, s_qh,  # q, k (batch, time, nheads, d_state), last stride 1
    s_vb, s_vt, s_vh,  # v, dy, dv (batch, time, nheads, headdim), last stride 1
    s_ab, s_at,  # adt, diag (batch, time, nheads), last stride 1
    s_sb,  # seg (batch, time)
    s_hb, s_hh, s_hp,  # dhT, dh0 (batch, nheads, headdim, d_state), last stride 1
    s_stb, s_sth, s_stc, s_stp,  # st: the state entering each chunk (batch, nheads, nchunks, headdim, d_state)
    s_blk_q, s_blk_a,  # the block axis of the partial sums dq/dk (like q, plus a leading axis) and dadt/ddiag
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_DHT: tl.constexpr, RANK: tl.constexpr,
):
    b, h, pid_p, offs_t, offs_p, offs_n, mask_p, mask_n, h_offs, h_mask, st_offs = _head_program(
        nheads, headdim, d_state, s_hb, s_hh, s_hp, s_stb, s_sth, s_stp, CHUNK, BLOCK_P, BLOCK_N)
    if HAS_DHT:
        dstate = tl.load(dhT_ptr + h_offs, mask=h_mask, other=0.0).to(tl.float32)
    else:
        dstate = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    is_last = offs_t == CHUNK - 1
    for rc in range(nchunks):
        c = nchunks - 1 - rc
        t, mask_t, qk_offs, qk_mask, v_offs, v_mask, a_offs, q, k, v, a, diag = _load_chunk(
            q_ptr, k_ptr, v_ptr, adt_ptr, diag_ptr, b, h, c, offs_t, offs_p, offs_n, mask_p, mask_n, seqlen,
            s_qb, s_qt, s_qh, s_vb, s_vt, s_vh, s_ab, s_at, CHUNK)
        dy = tl.load(dy_ptr + v_offs, mask=v_mask, other=0.0).to(tl.float32)
        state = tl.load(st_ptr + st_offs + c * s_stc, mask=h_mask, other=0.0)
        if HAS_SEG:  # the segment at the end of the chunk before
            seg_prev = tl.where(c > 0, tl.load(seg_ptr + b * s_sb + tl.maximum(c * CHUNK - 1, 0)), 0)
        else:
            seg_prev = 0
        acs, acs_last, keep, from_start, w, carry, _ = _chunk_decays(
            a, seg_ptr, b, t, mask_t, offs_t, seg_prev, s_sb, CHUNK, HAS_SEG, RANK)
        e_in = tl.where(from_start, tl.exp(acs), 0.0)  # the entering state's weight in each position's output
        decay = tl.exp(tl.where(keep, acs[:, None] - acs[None, :], 0.0))
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        mix = tl.where(keep, scores * decay, 0.0)
        dP = tl.dot(dy, tl.trans(v), input_precision="ieee")  # (T, T): dy_i . v_j over this headdim block
        dscores = tl.where(keep, dP * decay, 0.0)
        dy_state = tl.dot(dy, state, input_precision="ieee")  # (T, N)
        v_dstate = tl.dot(v, dstate, input_precision="ieee")  # (T, N)
        dq = tl.dot(dscores, k, input_precision="ieee") + dy_state * e_in[:, None]
        dk = tl.dot(tl.trans(dscores), q, input_precision="ieee") + v_dstate * w[:, None]
        dv = tl.dot(tl.trans(mix), dy, input_precision="ieee") + diag[:, None] * dy
        dv += tl.dot(k, tl.trans(dstate), input_precision="ieee") * w[:, None]
        if RANK > 1:  # MIMO: the same-step block own = q kg^T (no decay)
            kg = tl.load(kg_ptr + qk_offs, mask=qk_mask, other=0.0)
            same = _same_step(offs_t, RANK)
            down = tl.where(same, dP, 0.0)
            dq += tl.dot(down, kg, input_precision="ieee")
            dkg = tl.dot(tl.trans(down), q, input_precision="ieee")
            tl.store(dkg_ptr + pid_p * s_blk_q + qk_offs, dkg, mask=qk_mask)
            own = tl.where(same, tl.dot(q, tl.trans(kg), input_precision="ieee"), 0.0)
            dv += tl.dot(tl.trans(own), dy, input_precision="ieee")
        ddiag = tl.sum(dy * v, axis=1)
        # the gradient of the cumulated decay acs (then of adt by a reverse cumulative sum)
        m = dscores * scores
        dw = tl.sum(k * v_dstate, axis=1) * w
        dacs = tl.sum(m, axis=1) - tl.sum(m, axis=0) + tl.sum(dy_state * q, axis=1) * e_in - dw
        d_last = tl.sum(dw, axis=0) + carry * tl.exp(acs_last) * tl.sum(tl.sum(dstate * state, axis=1), axis=0)
        dacs += tl.where(is_last, d_last, 0.0)
        dadt = tl.cumsum(dacs, axis=0, reverse=True)
        tl.store(dv_ptr + v_offs, dv, mask=v_mask)
        tl.store(dq_ptr + pid_p * s_blk_q + qk_offs, dq, mask=qk_mask)
        tl.store(dk_ptr + pid_p * s_blk_q + qk_offs, dk, mask=qk_mask)
        tl.store(dadt_ptr + pid_p * s_blk_a + a_offs, dadt, mask=mask_t)
        tl.store(ddiag_ptr + pid_p * s_blk_a + a_offs, ddiag, mask=mask_t)
        dstate = carry * tl.exp(acs_last) * dstate + tl.dot(tl.trans(dy * e_in[:, None]), q, input_precision="ieee")
    tl.store(dh0_ptr + h_offs, dstate, mask=h_mask)
