"""The Mamba-3 SISO scan's forward as one portable Triton kernel (standard Triton only: no inline PTX, no TMA); with
RANK > 1 the same kernels run the MIMO scan (:mod:`mambakit.ops.mamba3.triton_mimo`).

The per-position pieces (angles carried over chunks, rotations, the trapezoid's weights) come from
:func:`mambakit.ops.mamba3.chunked.prepare` in PyTorch; the kernel runs the block decomposition: one program per
(batch, head, block of headdim) walks the chunks in order, keeping the state (headdim block, d_state) in registers.
Segments (seq_idx) are masks inside the kernel. With gradients, the kernel also saves the state entering each
chunk for the backward kernel (:mod:`mambakit.ops.mamba3.triton_bwd`); float32 accumulation, IEEE dots.

Non-finite inputs: unlike the PyTorch forms, the kernel's dot products do not keep a NaN in V from reaching
earlier positions of its chunk.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.causal import nan_where, not_finite, poisoned_lanes
from mambakit.ops.mamba3.chunked import prepare, start_state
from mambakit.ops.mamba3.common import segment_starts
from mambakit.ops.mamba3.triton_bwd import _mamba3_bwd_kernel
from mambakit.ops.mamba3.triton_tiles import _chunk_decays, _head_program, _load_chunk, _same_step
from mambakit.ops.triton.grid import cdiv, next_power_of_2


def interpreted() -> bool:
    """Whether Triton runs on the CPU interpreter (TRITON_INTERPRET=1), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _mamba3_fwd_kernel(
    q_ptr, k_ptr, v_ptr, adt_ptr, diag_ptr, seg_ptr, h0_ptr, y_ptr, hT_ptr, st_ptr, kg_ptr,
    seqlen, nheads, headdim, d_state, nchunks,
    s_qb, s_qt, s_qh,  # q and k (batch, time, nheads, d_state), last stride 1
    s_vb, s_vt, s_vh,  # v and y (batch, time, nheads, headdim), last stride 1
    s_ab, s_at,  # adt and diag (batch, time, nheads), last stride 1
    s_sb,  # seg (batch, time)
    s_hb, s_hh, s_hp,  # h0 and hT (batch, nheads, headdim, d_state), last stride 1
    s_stb, s_sth, s_stc, s_stp,  # st: the state entering each chunk (batch, nheads, nchunks, headdim, d_state)
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_H0: tl.constexpr, STORE_STATES: tl.constexpr, RANK: tl.constexpr,
):
    b, h, pid_p, offs_t, offs_p, offs_n, mask_p, mask_n, h_offs, h_mask, st_offs = _head_program(
        nheads, headdim, d_state, s_hb, s_hh, s_hp, s_stb, s_sth, s_stp, CHUNK, BLOCK_P, BLOCK_N)
    if HAS_H0:
        state = tl.load(h0_ptr + h_offs, mask=h_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    seg_prev = tl.zeros((), dtype=tl.int32)
    for c in range(nchunks):
        if STORE_STATES:
            tl.store(st_ptr + st_offs + c * s_stc, state, mask=h_mask)
        t, mask_t, qk_offs, qk_mask, v_offs, v_mask, a_offs, q, k, v, a, diag = _load_chunk(
            q_ptr, k_ptr, v_ptr, adt_ptr, diag_ptr, b, h, c, offs_t, offs_p, offs_n, mask_p, mask_n, seqlen,
            s_qb, s_qt, s_qh, s_vb, s_vt, s_vh, s_ab, s_at, CHUNK)
        acs, acs_last, keep, from_start, w, carry, seg_prev = _chunk_decays(
            a, seg_ptr, b, t, mask_t, offs_t, seg_prev, s_sb, CHUNK, HAS_SEG, RANK)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        decay = tl.exp(tl.where(keep, acs[:, None] - acs[None, :], 0.0))
        mix = tl.where(keep, scores * decay, 0.0)
        if RANK > 1:  # MIMO: the rows of one time step see each other through kg (k times its own weight)
            kg = tl.load(kg_ptr + qk_offs, mask=qk_mask, other=0.0)
            mix += tl.where(_same_step(offs_t, RANK), tl.dot(q, tl.trans(kg), input_precision="ieee"), 0.0)
        y = tl.dot(mix, v, input_precision="ieee")
        y += diag[:, None] * v
        inter = tl.dot(q, tl.trans(state), input_precision="ieee") * tl.exp(acs)[:, None]
        y += tl.where(from_start[:, None], inter, 0.0)
        tl.store(y_ptr + v_offs, y, mask=v_mask)
        chunk_state = tl.dot(tl.trans(v * w[:, None]), k, input_precision="ieee")
        state = tl.where(carry > 0, state * tl.exp(acs_last), 0.0) + chunk_state
    tl.store(hT_ptr + h_offs, state, mask=h_mask)


def _block(n: int) -> int:
    return max(16, next_power_of_2(n))


def _strides_of(*tensors: Tensor) -> dict:
    """The stride arguments shared by both kernels (every tensor contiguous, last stride 1)."""
    q, v, adt, hT, st = tensors
    return dict(s_qb=q.stride(0), s_qt=q.stride(1), s_qh=q.stride(2), s_vb=v.stride(0), s_vt=v.stride(1),
                s_vh=v.stride(2), s_ab=adt.stride(0), s_at=adt.stride(1), s_hb=hT.stride(0), s_hh=hT.stride(1),
                s_hp=hT.stride(2), s_stb=st.stride(0), s_sth=st.stride(1), s_stc=st.stride(2), s_stp=st.stride(3))


class _Mamba3Triton(torch.autograd.Function):
    """The kernels' part of the scan: (q, k, v, adt, diag, h0, seg, chunk, kg, rank) -> (y before the gate, the
    final ssm state).

    SISO (rank 1, kg None): q: (batch, seqlen, nheads, d_state) rotated C with bias; k: the same for B, times the
    trapezoid's weight scale; v: (batch, seqlen, nheads, headdim); adt, diag: (batch, seqlen, nheads), diag = the
    own-position weight of v (including D); h0: (batch, nheads, headdim, d_state) or None; seg: (batch, seqlen)
    int32 segment numbers or None. MIMO (rank R > 1, a power of two dividing chunk): the seqlen axis holds rows
    (time, rank), time-major; adt is zero but on each step's first row; kg: like k, the rotated B times its own
    weight gamma (the rows of one step meet through q kg^T); diag = D. All float32 and contiguous."""

    @staticmethod
    def forward(ctx, q, k, v, adt, diag, h0, seg, chunk, kg, rank):  # type: ignore[override]
        batch, L, nheads, headdim = v.shape
        d_state = q.shape[-1]
        nchunks = cdiv(L, chunk)
        store = any(ctx.needs_input_grad[:6]) or ctx.needs_input_grad[8]  # (forward runs with grad mode off)
        y = torch.empty_like(v)
        hT = v.new_empty(batch, nheads, headdim, d_state)
        st = v.new_empty(batch, nheads, nchunks if store else 1, headdim, d_state)
        block_p = min(_block(headdim), 64)
        grid = (batch * nheads, cdiv(headdim, block_p))
        _mamba3_fwd_kernel[grid](
            q, k, v, adt, diag, seg if seg is not None else adt, h0 if h0 is not None else hT, y, hT, st,
            kg if kg is not None else q, L, nheads, headdim, d_state, nchunks,
            s_sb=seg.stride(0) if seg is not None else 0, **_strides_of(q, v, adt, hT, st), CHUNK=chunk,
            BLOCK_P=block_p, BLOCK_N=_block(d_state), HAS_SEG=seg is not None, HAS_H0=h0 is not None,
            STORE_STATES=store, RANK=rank,
            # MIMO: the kg tiles take the default 3 stages to 264 KB of shared memory at rank 4, d_state 128 (sm_90:
            # 227 KB)
            num_stages=3 if rank == 1 else 1,
        )
        ctx.save_for_backward(q, k, v, adt, diag, seg, st, kg)
        ctx.chunk, ctx.has_h0, ctx.rank = chunk, h0 is not None, rank
        ctx.set_materialize_grads(False)
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):  # type: ignore[override]
        q, k, v, adt, diag, seg, st, kg = ctx.saved_tensors
        batch, L, nheads, headdim = v.shape
        d_state = q.shape[-1]
        dy = torch.zeros_like(v) if dy is None else dy.to(torch.float32).contiguous()
        dhT = None if dhT is None else dhT.to(torch.float32).contiguous()
        block_p = min(_block(headdim), 32)  # the backward holds about twice the forward's tiles
        nblocks = cdiv(headdim, block_p)
        dq = q.new_empty(nblocks, *q.shape)  # per headdim block partial sums, added up below (no atomics)
        dk = q.new_empty(nblocks, *q.shape)
        dkg = q.new_empty(nblocks, *q.shape) if kg is not None else dk
        dadt = adt.new_empty(nblocks, *adt.shape)
        ddiag = adt.new_empty(nblocks, *adt.shape)
        dv = torch.empty_like(v)
        dh0 = v.new_empty(batch, nheads, headdim, d_state)
        _mamba3_bwd_kernel[(batch * nheads, nblocks)](
            q, k, v, adt, diag, seg if seg is not None else adt, st, dy, dhT if dhT is not None else dh0,
            dq, dk, dv, dadt, ddiag, dh0, kg if kg is not None else q, dkg, L, nheads, headdim, d_state,
            cdiv(L, ctx.chunk), s_sb=seg.stride(0) if seg is not None else 0,
            **_strides_of(q, v, adt, dh0, st), s_blk_q=dq.stride(0), s_blk_a=dadt.stride(0), CHUNK=ctx.chunk,
            BLOCK_P=block_p, BLOCK_N=_block(d_state), HAS_SEG=seg is not None, HAS_DHT=dhT is not None,
            RANK=ctx.rank, num_warps=8,
            # SISO: 3 stages need 248 KB of shared memory at d_state 128 (sm_90: 227 KB), 2 need 149; MIMO (the
            # extra kg tiles) needs 264 KB with 2 stages, so one
            num_stages=2 if ctx.rank == 1 else 1,
        )
        return (dq.sum(0), dk.sum(0), dv, dadt.sum(0), ddiag.sum(0), dh0 if ctx.has_h0 else None, None, None,
                dkg.sum(0) if kg is not None else None, None)


def mamba3_scan_triton(
    Q: Tensor, K: Tensor, V: Tensor, ADT: Tensor, DT: Tensor, Trap: Tensor, Q_bias: Tensor, K_bias: Tensor,
    Angles: Tensor, D: Optional[Tensor] = None, Z: Optional[Tensor] = None,
    Input_States: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None, chunk_size: int = 64,
    return_final_states: bool = False, seq_idx: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """The Mamba-3 SISO scan by the Triton kernels; arguments and results as
    :func:`mambakit.ops.mamba3.mamba3_scan` (float16/bfloat16/float32 inputs, computed in float32; chunk_size is
    rounded up to a power of two >= 16). Differentiable: the per-position pieces (angles, rotations, weights) by
    PyTorch autograd, the scan by the deterministic backward kernel of :mod:`mambakit.ops.mamba3.triton_bwd`."""
    if not V.is_cuda and not interpreted():
        raise MambaKitError(f"mamba3_scan_triton needs CUDA tensors (or TRITON_INTERPRET=1), got V on {V.device}")
    if V.dtype == torch.float64:
        raise MambaKitError("mamba3_scan_triton takes float16, bfloat16 or float32 V, got float64")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise MambaKitError(f"chunk_size must be a positive int, got {chunk_size!r}")
    p = prepare(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, chunk_size, seq_idx)
    dims = p.dims
    if p.fp != torch.float32:
        raise MambaKitError(f"mamba3_scan_triton computes in float32; got an input of dtype {p.fp}")
    L = dims.seqlen
    chunk = max(16, next_power_of_2(min(chunk_size, L, 64)))  # the kernel's chunk (the function is the same)

    def flat(t: Tensor) -> Tensor:  # (batch, nchunks, Q, ...) -> contiguous (batch, seqlen, ...)
        return t.flatten(1, 2)[:, :L].contiguous()

    q, k_rot = flat(p.q_rot), flat(p.k_rot)
    k = (k_rot * flat(p.scale)[..., None]).contiguous()
    v, adt = flat(p.v), flat(p.adt)
    v_in, bad_v = v, not_finite(v.detach(), (3,))  # the kernel's chunk masks the future by multiplying V with 0
    v, poison = v.masked_fill(bad_v[..., None], 0.0), poisoned_lanes([bad_v], time_dim=1)
    diag = (q * k_rot).sum(-1) * flat(p.gamma)
    if D is not None:
        diag = diag + D.to(torch.float32)
    starts = segment_starts(seq_idx)
    seg = None if starts is None else starts.cumsum(1).to(torch.int32).contiguous()  # (batch, seqlen)
    h0 = start_state(p, Input_States).contiguous() if Input_States is not None else None
    y, hT = _Mamba3Triton.apply(q, k, v.contiguous(), adt, diag.contiguous(), h0, seg, chunk, None, 1)
    y, hT = nan_where(poison[..., None], y), nan_where(poison[:, -1, :, None, None], hT)
    if Z is not None:
        y = y * F.silu(Z.to(torch.float32))
    y = y.to(V.dtype)
    if not return_final_states:
        return y
    return y, p.final_angle, hT, k_rot[:, L - 1], v_in[:, L - 1]
