"""`mamba_ssm.ops.triton.ssd_state_passing`: the states entering each chunk from the chunks' own states
(`state_passing`, `state_passing_ref`), in PyTorch on any device, computed in float32 (float64 for float64)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.checks import require_tensors
from mambakit.ops.dt import compute_dtype

__all__ = ["state_passing", "state_passing_ref"]


def _passed(states: Tensor, dA_chunk_cumsum: Tensor, initial_states: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(out (batch, nchunks, nheads, dim), final (batch, nheads, dim)) in the compute dtype:
    out[0] = initial_states (or 0), out[c + 1] = exp(dA_chunk_cumsum[c]) out[c] + states[c], final = out[nchunks]."""
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
    out = []
    for c in range(nchunks):
        out.append(s)
        s = decay[:, :, c, None] * s + states[:, c].to(fp)
    return torch.stack(out, 1) if out else states.to(fp), s


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
