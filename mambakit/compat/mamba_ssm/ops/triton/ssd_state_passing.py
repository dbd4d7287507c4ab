"""`mamba_ssm.ops.triton.ssd_state_passing`: the states entering each chunk from the chunks' own states
(`state_passing`, `state_passing_ref`), in PyTorch on any device, computed in float32 (float64 for float64)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.checks import require_tensors
from mambakit.ops.dt import compute_dtype

__all__ = ["state_passing", "state_passing_ref", "_state_passing_fwd"]


def _passed(states: Tensor, dA_chunk_cumsum: Tensor, initial_states: Optional[Tensor],
            seq_idx: Optional[Tensor] = None, chunk_size: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(out (batch, nchunks, nheads, dim), final (batch, nheads, dim)) in the compute dtype:
    out[0] = initial_states (or 0), out[c + 1] = exp(dA_chunk_cumsum[c]) out[c] + states[c], final = out[nchunks];
    with seq_idx (batch, seqlen) and chunk_size, the decay is 0 where chunk c's last position (within seqlen) starts
    another sequence than chunk c - 1's (the first chunk compares against sequence 0)."""
    require_tensors(states=states, dA_chunk_cumsum=dA_chunk_cumsum, initial_states=initial_states)
    if states.dim() != 4:
        raise MambaKitError(f"states must have shape (batch, nchunks, nheads, dim), got {tuple(states.shape)}")
    batch, nchunks, nheads, dim = states.shape
    if tuple(dA_chunk_cumsum.shape) != (batch, nheads, nchunks):
        raise MambaKitError(f"dA_chunk_cumsum must have shape (batch, nheads, nchunks) = {(batch, nheads, nchunks)}, "
                            f"got {tuple(dA_chunk_cumsum.shape)}")
    if initial_states is not None and tuple(initial_states.shape) != (batch, nheads, dim):
        raise MambaKitError(f"initial_states must have shape (batch, nheads, dim) = {(batch, nheads, dim)}, got "
                            f"{tuple(initial_states.shape)}")
    fp = compute_dtype(states, dA_chunk_cumsum, initial_states)
    s = states.new_zeros(batch, nheads, dim, dtype=fp) if initial_states is None else initial_states.to(fp)
    decay = torch.exp(dA_chunk_cumsum.to(fp))
    if seq_idx is not None:
        decay = decay * _same_sequence_as_before(seq_idx, chunk_size, nchunks).to(fp)[:, None]
    out = []
    for c in range(nchunks):
        out.append(s)
        s = decay[:, :, c, None] * s + states[:, c].to(fp)
    return torch.stack(out, 1) if out else states.to(fp), s


def _same_sequence_as_before(seq_idx: Tensor, chunk_size: Optional[int], nchunks: int) -> Tensor:
    """(batch, nchunks) bool: the sequence at chunk c's last position is that at chunk c - 1's (c = 0: sequence 0)."""
    if chunk_size is None or seq_idx.dim() != 2 or seq_idx.is_floating_point():
        raise MambaKitError(f"seq_idx needs chunk_size and must be an integer tensor (batch, seqlen), got chunk_size="
                            f"{chunk_size!r}, seq_idx {seq_idx.dtype} {tuple(seq_idx.shape)}")
    seqlen = seq_idx.shape[1]
    if not (nchunks - 1) * chunk_size < seqlen <= nchunks * chunk_size:
        raise MambaKitError(f"seq_idx's seqlen={seqlen} must need nchunks={nchunks} chunks of chunk_size={chunk_size}")
    ends = [min((c + 1) * chunk_size, seqlen) - 1 for c in range(nchunks)]
    last = seq_idx[:, ends].long()
    return last == F.pad(last, (1, 0))[:, :-1]


def _state_passing_fwd(states: Tensor, dA_chunk_cumsum: Tensor, initial_states: Optional[Tensor] = None,
                       seq_idx: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                       out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """The official private step's signature: `state_passing` with seq_idx (batch, seqlen) and chunk_size (the
    state is reset where a chunk ends in a new sequence); out in out_dtype (default: states'), final_states in float32
    (float64 for float64 inputs)."""
    out, final = _passed(states, dA_chunk_cumsum, initial_states, seq_idx, chunk_size)
    return out.to(out_dtype or states.dtype), final


def state_passing(states: Tensor, dA_chunk_cumsum: Tensor,
                  initial_states: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Official signature: states (batch, nchunks, nheads, dim), each chunk's state from zero (dim: headdim * dstate
    flattened); dA_chunk_cumsum (batch, nheads, nchunks), each chunk's total dt * A; initial_states (batch, nheads,
    dim). Returns out (batch, nchunks, nheads, dim) in states' dtype, the state entering each chunk
    (out[:, 0] = initial_states or 0), and final_states (batch, nheads, dim) in float32 (float64 for float64
    inputs). Differentiable by autograd in all three."""
    out, final = _passed(states, dA_chunk_cumsum, initial_states)
    return out.to(states.dtype), final


def state_passing_ref(states: Tensor, dA_chunk_cumsum: Tensor,
                      initial_states: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The official reference's signature: `state_passing` with both results in states' dtype."""
    out, final = _passed(states, dA_chunk_cumsum, initial_states)
    return out.to(states.dtype), final.to(states.dtype)
