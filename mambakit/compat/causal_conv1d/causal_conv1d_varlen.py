"""`causal_conv1d.causal_conv1d_varlen`: the conv states of packed sequences, for starting their decoding.

x: (total_tokens, dim), the sequences one after another; cu_seqlens: (num_seqs + 1,) integer, from 0, not
decreasing, the last at most total_tokens. The state of sequence i holds its last state_len inputs, right-aligned,
zero where the sequence is shorter: states (num_seqs, dim, state_len) in x's dtype, stored channel-last (stride 1
over dim) like the official one. One gather, any device, differentiable in x (the official is forward only).
"""
from __future__ import annotations

import torch
from torch import Tensor

from mambakit.errors import MambaKitError

__all__ = ["causal_conv1d_varlen_states", "causal_conv1d_varlen_states_ref"]


def causal_conv1d_varlen_states(x: Tensor, cu_seqlens: Tensor, state_len: int) -> Tensor:
    """The last `state_len` inputs of each packed sequence: (num_seqs, dim, state_len), zero before a sequence's
    start."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise MambaKitError(f"x must have shape (total_tokens, dim), got {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(state_len, int) or isinstance(state_len, bool) or state_len < 1:
        raise MambaKitError(f"state_len must be a positive int, got {state_len!r}")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() \
            or cu_seqlens.numel() < 1:
        raise MambaKitError("cu_seqlens must be a 1-D integer tensor (num_seqs + 1,), got "
                            f"{getattr(cu_seqlens, 'shape', type(cu_seqlens).__name__)}")
    total = x.shape[0]
    cu = cu_seqlens.to(device=x.device, dtype=torch.long)
    bad = (cu[0] != 0) | (cu[-1] > total) | (cu[1:] < cu[:-1]).any()
    if bool(bad):
        raise MambaKitError(f"cu_seqlens must rise from 0 without decreasing to at most total_tokens={total}, got "
                            f"{cu_seqlens.tolist()}")
    start, end = cu[:-1], cu[1:]
    pos = end[:, None] - state_len + torch.arange(state_len, device=x.device)  # (num_seqs, state_len)
    keep = pos >= start[:, None]
    rows = x[pos.clamp(min=0).flatten()].unflatten(0, pos.shape)  # (num_seqs, state_len, dim)
    return rows.masked_fill(~keep[..., None], 0).transpose(1, 2)


def causal_conv1d_varlen_states_ref(x: Tensor, cu_seqlens: Tensor, state_len: int) -> Tensor:
    """The official reference's signature: the same function."""
    return causal_conv1d_varlen_states(x, cu_seqlens, state_len)
