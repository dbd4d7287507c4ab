"""The Mamba-3 SISO scan's forward as one portable Triton kernel (standard Triton only: no inline PTX, no TMA).

The per-position pieces (angles carried over chunks, rotations, the trapezoid's weights) come from
:func:`mambakit.ops.mamba3.chunked.prepare` in PyTorch; the kernel runs the block decomposition: one program per
(batch, head, block of headdim) walks the chunks in order, keeping the state (headdim block, d_state) in registers.
Segments (seq_idx) are masks inside the kernel. Forward only (no backward yet); float32 accumulation, IEEE dots.

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


def interpreted() -> bool:
    """Whether Triton runs on the CPU interpreter (TRITON_INTERPRET=1), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _mamba3_fwd_kernel(
    q_ptr, k_ptr, v_ptr, adt_ptr, diag_ptr, seg_ptr, h0_ptr, y_ptr, hT_ptr, D_ptr,
    seqlen, nheads, headdim, d_state, nchunks,
    s_qb, s_qt, s_qh,  # q and k (batch, time, nheads, d_state), last stride 1
    s_vb, s_vt, s_vh,  # v and y (batch, time, nheads, headdim), last stride 1
    s_ab, s_at,  # adt and diag (batch, time, nheads), last stride 1
    s_sb,  # seg (batch, time)
    s_hb, s_hh, s_hp,  # h0 and hT (batch, nheads, headdim, d_state), last stride 1
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_H0: tl.constexpr, HAS_D: tl.constexpr,
):
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
    if HAS_H0:
        state = tl.load(h0_ptr + h_offs, mask=h_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if HAS_D:
        d_skip = tl.load(D_ptr + h).to(tl.float32)
    else:
        d_skip = 0.0
    below = offs_t[:, None] > offs_t[None, :]
    seg_prev = tl.zeros((), dtype=tl.int32)
    for c in range(nchunks):
        t = c * CHUNK + offs_t
        mask_t = t < seqlen
        qk_offs = b * s_qb + t[:, None] * s_qt + h * s_qh + offs_n[None, :]
        qk_mask = mask_t[:, None] & mask_n[None, :]
        q = tl.load(q_ptr + qk_offs, mask=qk_mask, other=0.0)
        k = tl.load(k_ptr + qk_offs, mask=qk_mask, other=0.0)
        v_offs = b * s_vb + t[:, None] * s_vt + h * s_vh + offs_p[None, :]
        v_mask = mask_t[:, None] & mask_p[None, :]
        v = tl.load(v_ptr + v_offs, mask=v_mask, other=0.0)
        a = tl.load(adt_ptr + b * s_ab + t * s_at + h, mask=mask_t, other=0.0)
        diag = tl.load(diag_ptr + b * s_ab + t * s_at + h, mask=mask_t, other=0.0)
        acs = tl.cumsum(a, axis=0)
        acs_last = tl.sum(a, axis=0)
        if HAS_SEG:
            seg = tl.load(seg_ptr + b * s_sb + t, mask=mask_t, other=0)
            seg_last = tl.max(tl.where(mask_t, seg, 0), axis=0)
            keep = below & (seg[:, None] == seg[None, :])
            from_start = seg == seg_prev
            to_end = seg == seg_last
        else:
            keep = below
            from_start = offs_t >= 0
            to_end = offs_t >= 0
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        decay = tl.exp(tl.where(keep, acs[:, None] - acs[None, :], 0.0))
        mix = tl.where(keep, scores * decay, 0.0)
        y = tl.dot(mix, v, input_precision="ieee")
        y += (diag + d_skip)[:, None] * v
        inter = tl.dot(q, tl.trans(state), input_precision="ieee") * tl.exp(acs)[:, None]
        y += tl.where(from_start[:, None], inter, 0.0)
        tl.store(y_ptr + v_offs, y, mask=v_mask)
        w = tl.where(to_end & mask_t, tl.exp(tl.where(to_end, acs_last - acs, 0.0)), 0.0)
        chunk_state = tl.dot(tl.trans(v * w[:, None]), k, input_precision="ieee")
        if HAS_SEG:
            state = tl.where(seg_last == seg_prev, state * tl.exp(acs_last), 0.0) + chunk_state
            seg_prev = seg_last
        else:
            state = state * tl.exp(acs_last) + chunk_state
    tl.store(hT_ptr + h_offs, state, mask=h_mask)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def mamba3_scan_triton(
    Q: Tensor, K: Tensor, V: Tensor, ADT: Tensor, DT: Tensor, Trap: Tensor, Q_bias: Tensor, K_bias: Tensor,
    Angles: Tensor, D: Optional[Tensor] = None, Z: Optional[Tensor] = None,
    Input_States: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None, chunk_size: int = 64,
    return_final_states: bool = False, seq_idx: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """The Mamba-3 SISO scan's forward by the Triton kernel; arguments and results as
    :func:`mambakit.ops.mamba3.mamba3_scan` (float16/bfloat16/float32 inputs, computed in float32; chunk_size is
    rounded up to a power of two >= 16). No gradients: raises MambaKitError when an input requires one."""
    if not V.is_cuda and not interpreted():
        raise MambaKitError(f"mamba3_scan_triton needs CUDA tensors (or TRITON_INTERPRET=1), got V on {V.device}")
    if V.dtype == torch.float64:
        raise MambaKitError("mamba3_scan_triton takes float16, bfloat16 or float32 V, got float64")
    tensors = [Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, *(Input_States or ())]
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors):
        raise MambaKitError("mamba3_scan_triton is forward only: call it under torch.no_grad() or with inputs that "
                            "do not require grad")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise MambaKitError(f"chunk_size must be a positive int, got {chunk_size!r}")
    p = prepare(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, Input_States, chunk_size, seq_idx)
    dims = p.dims
    if p.fp != torch.float32:
        raise MambaKitError(f"mamba3_scan_triton computes in float32; got an input of dtype {p.fp}")
    L = dims.seqlen
    chunk = max(16, triton.next_power_of_2(min(chunk_size, L, 64)))  # the kernel's chunk (the function is the same)

    def flat(t: Tensor) -> Tensor:  # (batch, nchunks, Q, ...) -> contiguous (batch, seqlen, ...)
        return t.flatten(1, 2)[:, :L].contiguous()

    q, k_rot = flat(p.q_rot), flat(p.k_rot)
    k = (k_rot * flat(p.scale)[..., None]).contiguous()
    v, adt = flat(p.v), flat(p.adt)
    v_in, bad_v = v, not_finite(v, (3,))  # the kernel's chunk masks the future by multiplying V with 0: zero it
    v, poison = v.masked_fill(bad_v[..., None], 0.0), poisoned_lanes([bad_v], time_dim=1)
    diag = ((q * k_rot).sum(-1) * flat(p.gamma)).contiguous()
    starts = segment_starts(seq_idx)
    seg = None if starts is None else starts.cumsum(1).to(torch.int32).contiguous()  # (batch, seqlen)
    h0 = start_state(p, Input_States).contiguous() if Input_States is not None else None
    y = torch.empty_like(v)
    hT = torch.empty(dims.batch, dims.nheads, dims.headdim, dims.d_state, dtype=torch.float32, device=V.device)
    block_p = min(_block(dims.headdim), 64)
    grid = (dims.batch * dims.nheads, triton.cdiv(dims.headdim, block_p))
    _mamba3_fwd_kernel[grid](
        q, k, v, adt, diag, seg if seg is not None else adt, h0 if h0 is not None else hT, y, hT,
        D.to(torch.float32).contiguous() if D is not None else adt,
        L, dims.nheads, dims.headdim, dims.d_state, triton.cdiv(L, chunk),
        q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2), adt.stride(0), adt.stride(1),
        seg.stride(0) if seg is not None else 0, hT.stride(0), hT.stride(1), hT.stride(2),
        CHUNK=chunk, BLOCK_P=block_p, BLOCK_N=_block(dims.d_state), HAS_SEG=seg is not None,
        HAS_H0=h0 is not None, HAS_D=D is not None,
    )
    y, hT = nan_where(poison[..., None], y), nan_where(poison[:, -1, :, None, None], hT)
    if Z is not None:
        y = y * F.silu(Z.to(torch.float32))
    y = y.to(V.dtype)
    if not return_final_states:
        return y
    return y, p.final_angle, hT, k_rot[:, L - 1], v_in[:, L - 1]

