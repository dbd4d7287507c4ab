"""The one dt processing (bias, softplus, clamp) and the one padding rule, in both layouts; packed-sequence
segments."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mambakit.ops.dt import DEFAULT_DT_LIMIT, compute_dtype, mask_dt, process_dt
from mambakit.ops.segments import causal_segment_mask, segments, sequence_starts


def test_process_dt_in_both_layouts():
    g = torch.Generator().manual_seed(0)
    dt = torch.randn(2, 7, 3, generator=g, dtype=torch.float64) * 4  # (batch, seqlen, nheads): bias on the last dim
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    assert torch.equal(process_dt(dt, bias, True), F.softplus(dt + bias))
    assert torch.equal(process_dt(dt, bias, True, (0.1, 2.0)), F.softplus(dt + bias).clamp(0.1, 2.0))
    assert torch.equal(process_dt(dt), dt) and DEFAULT_DT_LIMIT == (0.0, math.inf)
    delta = dt.transpose(1, 2)  # (batch, dim, seqlen): bias on dim 1
    assert torch.equal(process_dt(delta, bias, True, channel_dim=1), F.softplus(delta + bias[:, None]))
    assert process_dt(dt.half(), bias, dtype=torch.float32).dtype == torch.float32


def test_mask_dt_zeroes_the_pads_and_their_gradient():
    dt = torch.rand(2, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    out = mask_dt(dt, mask, time_dim=1)
    assert torch.equal(out, dt * mask[..., None])
    out.sum().backward()
    assert torch.equal(dt.grad, mask[..., None].double().expand(2, 5, 3))
    delta = dt.detach().transpose(1, 2)  # (batch, dim, seqlen)
    assert torch.equal(mask_dt(delta, mask, time_dim=2), delta * mask[:, None, :])
    assert mask_dt(delta, None) is delta


def test_compute_dtype():
    assert compute_dtype(torch.zeros(1, dtype=torch.half), None) == torch.float32
    assert compute_dtype(torch.zeros(1), torch.zeros(1, dtype=torch.float64)) == torch.float64


def test_segments_starts_and_masks():
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, 2, 2]])
    assert torch.equal(segments(seq_idx), torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]))
    assert segments(torch.zeros(2, 4, dtype=torch.long)) is None and segments(None) is None
    assert torch.equal(sequence_starts(seq_idx), torch.tensor([[False, False, True, False, False]] + [[False] * 5]))
    keep = causal_segment_mask(5, segments(seq_idx), seq_idx.device)
    assert keep.shape == (2, 5, 5) and not keep[0, 2, 1] and keep[0, 4, 2] and keep[1, 4, 0] and not keep[1, 0, 1]
    assert torch.equal(causal_segment_mask(3, None, seq_idx.device)[0], torch.ones(3, 3, dtype=torch.bool).tril())
