"""`mamba_ssm.ops.triton.ssd_chunk_state`: the states each chunk builds from zero (`chunk_state`, `chunk_state_ref`)
and the final state of each packed sequence from them (`chunk_state_varlen`), in PyTorch on any device.

The chunked layout (official): x (batch, seqlen, nheads, headdim); B (batch, seqlen, ngroups, dstate), head h using
group h // (nheads // ngroups); dt and dA_cumsum (batch, nheads, nchunks, chunk_size), the processed dt and the
cumulative sum of dt * A within each chunk; seqlen <= nchunks * chunk_size (the positions past seqlen count as
zero). Computed in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.checks import require_tensors
from mambakit.ops.dt import DEFAULT_DT_LIMIT, compute_dtype, process_dt

__all__ = ["chunk_state", "chunk_state_ref", "chunk_state_varlen", "_chunk_cumsum_fwd", "_chunk_state_fwd"]


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


def _chunk_states(B: Tensor, x: Tensor, dt: Tensor, dA_cumsum: Tensor, seq_idx: Optional[Tensor] = None) -> Tensor:
    """(batch, nchunks, nheads, headdim, dstate) in the compute dtype: sum over a chunk's positions l of
    exp(dA_cumsum[last] - dA_cumsum[l]) dt_l x_l B_l^T; with seq_idx (batch, seqlen), only the positions of the
    sequence that holds the chunk's last position (within seqlen) count."""
    dims = check_chunked(B, x, dt, dA_cumsum)
    fp = compute_dtype(B, x, dt, dA_cumsum)
    dA = dA_cumsum.to(fp)
    weight = torch.exp(dA[..., -1:] - dA) * dt.to(fp)  # (batch, nheads, nchunks, chunk_size)
    if seq_idx is not None:
        weight = weight * _same_sequence_as_last(seq_idx, dims).to(fp)[:, None]
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


def _chunked_seq_idx(seq_idx: Tensor, dims: ChunkDims) -> Tensor:
    """seq_idx (batch, seqlen) integer -> (batch, nchunks, chunk_size), padded past seqlen with the last entry."""
    if tuple(seq_idx.shape) != (dims.batch, dims.seqlen) or seq_idx.is_floating_point():
        raise MambaKitError(f"seq_idx must be an integer tensor of shape (batch, seqlen) = {(dims.batch, dims.seqlen)},"
                            f" got {seq_idx.dtype} {_shape(seq_idx)}")
    pad = dims.nchunks * dims.chunk_size - dims.seqlen
    return F.pad(seq_idx.long(), (0, pad), mode="replicate").view(dims.batch, dims.nchunks, dims.chunk_size)


def _same_sequence_as_last(seq_idx: Tensor, dims: ChunkDims) -> Tensor:
    """(batch, nchunks, chunk_size) bool: position l of chunk c belongs to the sequence of c's last position."""
    chunked = _chunked_seq_idx(seq_idx, dims)
    return chunked == chunked[..., -1:]


def _chunk_cumsum_fwd(dt: Tensor, A: Tensor, chunk_size: int, dt_bias: Optional[Tensor] = None,
                      dt_softplus: bool = False,
                      dt_limit: Sequence[float] = DEFAULT_DT_LIMIT) -> Tuple[Tensor, Tensor]:
    """The official private step's signature: dt (batch, seqlen, nheads), A (nheads,), dt_bias (nheads,). Returns
    (dA_cumsum, dt_out), both (batch, nheads, nchunks, chunk_size) in float32 (float64 for float64 inputs):
    dt_out the processed dt (bias, softplus, clamp; 0 past seqlen), dA_cumsum its product with A summed within each
    chunk."""
    require_tensors(dt=dt, A=A, dt_bias=dt_bias)
    if dt.dim() != 3 or A.shape != (dt.shape[2],):
        raise MambaKitError(f"dt must be (batch, seqlen, nheads) and A (nheads,), got {_shape(dt)} and {_shape(A)}")
    if int(chunk_size) < 1:
        raise MambaKitError(f"chunk_size must be a positive int, got {chunk_size!r}")
    batch, seqlen, nheads = dt.shape
    nchunks = -(-seqlen // chunk_size)
    fp = compute_dtype(dt, A, dt_bias)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype=fp)
    dt = F.pad(dt, (0, 0, 0, nchunks * chunk_size - seqlen)).view(batch, nchunks, chunk_size, nheads)
    dt = dt.permute(0, 3, 1, 2)
    return torch.cumsum(dt * A.to(fp)[:, None, None], dim=-1), dt


def _chunk_state_fwd(B: Tensor, x: Tensor, dt: Tensor, dA_cumsum: Tensor, seq_idx: Optional[Tensor] = None,
                     states: Optional[Tensor] = None, states_in_fp32: bool = True) -> Tensor:
    """The official private step's signature: `chunk_state` with seq_idx (batch, seqlen) (a chunk's state keeps
    only the positions of the sequence holding its last position); `states`, if given, receives the result."""
    out = _chunk_states(B, x, dt, dA_cumsum, seq_idx)
    out = out if states_in_fp32 else out.to(B.dtype)
    if states is None:
        return out
    if states.shape != out.shape:
        raise MambaKitError(f"states must have shape {_shape(out)}, got {_shape(states)}")
    return states.copy_(out)
