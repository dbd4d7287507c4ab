"""`mamba_ssm.ops.triton.ssd_chunk_state`: the states each chunk builds from zero (`chunk_state`, `chunk_state_ref`)
and the final state of each packed sequence from them (`chunk_state_varlen`), in PyTorch on any device.

The chunked layout (official): x (batch, seqlen, nheads, headdim); B (batch, seqlen, ngroups, dstate), head h using
group h // (nheads // ngroups); dt and dA_cumsum (batch, nheads, nchunks, chunk_size), the processed dt and the
cumulative sum of dt * A within each chunk; seqlen <= nchunks * chunk_size (the positions past seqlen count as
zero). Computed in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.checks import require_tensors
from mambakit.ops.dt import compute_dtype

__all__ = ["chunk_state", "chunk_state_ref", "chunk_state_varlen"]


class ChunkDims(NamedTuple):
    batch: int
    seqlen: int
    nheads: int
    headdim: int
    ngroups: int
    dstate: int
    nchunks: int
    chunk_size: int


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def check_chunked(B: Tensor, x: Tensor, dt: Tensor, dA_cumsum: Tensor, **others: Tensor) -> ChunkDims:
    """The sizes of the chunked layout, checked; `others` are more (name: tensor) arguments of B's shape."""
    require_tensors(B=B, x=x, dt=dt, dA_cumsum=dA_cumsum, **others)
    if x.dim() != 4:
        raise MambaKitError(f"x must have shape (batch, seqlen, nheads, headdim), got {_shape(x)}")
    batch, seqlen, nheads, headdim = x.shape
    if B.dim() != 4 or B.shape[:2] != x.shape[:2] or nheads % B.shape[2]:
        raise MambaKitError(f"B must have shape (batch={batch}, seqlen={seqlen}, ngroups, dstate) with ngroups "
                            f"dividing nheads={nheads}, got {_shape(B)}")
    for name, t in others.items():
        if t is not None and t.shape != B.shape:
            raise MambaKitError(f"{name} must have B's shape {_shape(B)}, got {_shape(t)}")
    if dt.dim() != 4 or dt.shape[:2] != (batch, nheads):
        raise MambaKitError(f"dt must have shape (batch={batch}, nheads={nheads}, nchunks, chunk_size), got "
                            f"{_shape(dt)}")
    if dA_cumsum.shape != dt.shape:
        raise MambaKitError(f"dA_cumsum must have dt's shape {_shape(dt)}, got {_shape(dA_cumsum)}")
    nchunks, chunk_size = dt.shape[2:]
    if not (nchunks - 1) * chunk_size < seqlen <= nchunks * chunk_size:
        raise MambaKitError(f"dt's nchunks={nchunks} chunks of chunk_size={chunk_size} must cover seqlen={seqlen} "
                            f"(nchunks = ceil(seqlen / chunk_size))")
    return ChunkDims(batch, seqlen, nheads, headdim, B.shape[2], B.shape[3], nchunks, chunk_size)


def to_chunks(t: Tensor, dims: ChunkDims, dtype: torch.dtype, heads: bool = False) -> Tensor:
    """(batch, seqlen, k, d) -> (batch, nchunks, chunk_size, k or nheads, d) in dtype, zero past seqlen; with
    `heads`, a groups tensor (k = ngroups) repeated to one entry per head."""
    pad = dims.nchunks * dims.chunk_size - dims.seqlen
    t = F.pad(t.to(dtype), (0, 0, 0, 0, 0, pad)).unflatten(1, (dims.nchunks, dims.chunk_size))
    return t.repeat_interleave(dims.nheads // dims.ngroups, dim=3) if heads else t


def _chunk_states(B: Tensor, x: Tensor, dt: Tensor, dA_cumsum: Tensor) -> Tensor:
    """(batch, nchunks, nheads, headdim, dstate) in the compute dtype: sum over a chunk's positions l of
    exp(dA_cumsum[last] - dA_cumsum[l]) dt_l x_l B_l^T."""
    dims = check_chunked(B, x, dt, dA_cumsum)
    fp = compute_dtype(B, x, dt, dA_cumsum)
    dA = dA_cumsum.to(fp)
    weight = torch.exp(dA[..., -1:] - dA) * dt.to(fp)  # (batch, nheads, nchunks, chunk_size)
    return torch.einsum("bclhn,bhcl,bclhp->bchpn", to_chunks(B, dims, fp, heads=True), weight,
                        to_chunks(x, dims, fp))


def chunk_state(B: Tensor, x: Tensor, dt: Tensor, dA_cumsum: Tensor, states_in_fp32: bool = True) -> Tensor:
    """Each chunk's state from a zero start, official signature: B (batch, seqlen, ngroups, dstate), x (batch,
    seqlen, nheads, headdim), dt and dA_cumsum (batch, nheads, nchunks, chunk_size). Returns states (batch, nchunks,
    nheads, headdim, dstate) in float32 (float64 for float64 inputs), or B's dtype with `states_in_fp32=False`.
    Differentiable by autograd in B, x, dt and dA_cumsum."""
    states = _chunk_states(B, x, dt, dA_cumsum)
    return states if states_in_fp32 else states.to(B.dtype)


def chunk_state_ref(B: Tensor, x: Tensor, dt: Tensor, dA_cumsum: Tensor) -> Tensor:
    """The official reference's signature: `chunk_state` returned in x's dtype."""
    return _chunk_states(B, x, dt, dA_cumsum).to(x.dtype)


def chunk_state_varlen(B: Tensor, x: Tensor, dt: Tensor, dA_cumsum: Tensor, cu_seqlens: Tensor,
                       chunk_states: Tensor) -> Tensor:
    """The final state of each packed sequence, official signature: x (total_seqlen, nheads, headdim), B
    (total_seqlen, ngroups, dstate), dt and dA_cumsum (nheads, nchunks, chunk_size), cu_seqlens (num_seqs + 1,)
    integer from 0 to total_seqlen, chunk_states (nchunks, nheads, headdim, dstate): the state entering each chunk
    (state passing reset at each sequence start). A sequence ending in chunk c gets its positions in chunk c,
    decayed to its end, plus chunk_states[c] decayed over chunk c when it started before chunk c; an empty sequence
    gets zeros. Returns (num_seqs, nheads, headdim, dstate) in chunk_states' dtype (computed in float32, float64 for
    float64 inputs); differentiable by autograd (the official is forward only)."""
    require_tensors(cu_seqlens=cu_seqlens, chunk_states=chunk_states)
    if x.dim() != 3 or B.dim() != 3 or dt.dim() != 3 or dA_cumsum.dim() != 3:
        raise MambaKitError(f"x, B, dt, dA_cumsum must be 3-D (total_seqlen, nheads, headdim), (total_seqlen, "
                            f"ngroups, dstate), (nheads, nchunks, chunk_size), got {_shape(x)}, {_shape(B)}, "
                            f"{_shape(dt)}, {_shape(dA_cumsum)}")
    dims = check_chunked(B[None], x[None], dt[None], dA_cumsum[None])
    want = (dims.nchunks, dims.nheads, dims.headdim, dims.dstate)
    if _shape(chunk_states) != want:
        raise MambaKitError(f"chunk_states must have shape (nchunks, nheads, headdim, dstate) = {want}, got "
                            f"{_shape(chunk_states)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.numel() < 2:
        raise MambaKitError(f"cu_seqlens must be a 1-D integer tensor (num_seqs + 1,), got {_shape(cu_seqlens)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != dims.seqlen or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise MambaKitError(f"cu_seqlens must rise from 0 to total_seqlen={dims.seqlen} without decreasing, got "
                            f"{bounds}")
    fp = compute_dtype(B, x, dt, dA_cumsum, chunk_states)
    Q, reps = dims.chunk_size, dims.nheads // dims.ngroups
    out = []
    for start, end in zip(bounds, bounds[1:]):
        if end == start:
            out.append(chunk_states.new_zeros(want[1:], dtype=fp))
            continue
        c = (end - 1) // Q
        lo = max(start, c * Q)
        dA = dA_cumsum[:, c].to(fp)  # (nheads, chunk_size)
        last = dA[:, end - 1 - c * Q]
        w = torch.exp(torch.clamp(last[:, None] - dA[:, lo - c * Q:end - c * Q], max=0)) \
            * dt[:, c, lo - c * Q:end - c * Q].to(fp)  # (nheads, positions)
        s = torch.einsum("hl,lhp,lhn->hpn", w, x[lo:end].to(fp), B[lo:end].to(fp).repeat_interleave(reps, 1))
        if start < c * Q:
            s = s + torch.exp(last)[:, None, None] * chunk_states[c].to(fp)
        out.append(s)
    return torch.stack(out).to(chunk_states.dtype)
