"""Packed sequences: ``seq_idx`` (batch, seqlen) integer labels; no information crosses a change of label.

Written once for every op and application: the segment number of each position, where new sequences start, and
the causal same-sequence mask of the quadratic forms.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def segments(seq_idx: Optional[Tensor]) -> Optional[Tensor]:
    """Segment number of each position, (batch, seqlen) int64: 0 up to the first change of seq_idx, then +1 at
    every change. Returns None without seq_idx or when no sequence boundary occurs (nothing to mask)."""
    if seq_idx is None:
        return None
    change = seq_idx[:, 1:] != seq_idx[:, :-1]
    if not bool(change.any()):
        return None
    return F.pad(change.cumsum(dim=1), (1, 0))


def sequence_starts(seq_idx: Tensor) -> Tensor:
    """(batch, seqlen) bool, True where a new sequence starts (never at t = 0: an initial state applies there)."""
    starts = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def causal_segment_mask(seqlen: int, seg: Optional[Tensor], device: torch.device) -> Tensor:
    """bool (batch or 1, seqlen, seqlen): True where j <= i and positions i, j lie in the same segment.

    seg: segment numbers from :func:`segments` (None: one sequence).
    """
    keep = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()[None]
    if seg is not None:
        keep = keep & (seg[:, :, None] == seg[:, None, :])
    return keep
