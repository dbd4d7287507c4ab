"""seq_idx = -1 (padding) through the Triton conv on the CPU interpreter: the kernel drops the taps of other
sequences but leaves the padded positions' outputs; the dispatcher's `zero_padding` sets them to 0, which makes the
CUDA path equal to the PyTorch path (outputs and gradients, from a conv state too)."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch

from mambakit.ops.conv1d import causal_conv1d_fn
from mambakit.ops.conv1d.naive import zero_padding
from tests.conftest import rel_err
from tests.ops.triton import interpreted_module

conv_triton = interpreted_module("mambakit.ops.conv1d.triton")


@pytest.mark.parametrize("from_state", [False, True])
def test_padding_is_zero_and_matches_torch(from_state):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 12, generator=g).requires_grad_()
    w, b = torch.randn(3, 4, generator=g).requires_grad_(), torch.randn(3, generator=g).requires_grad_()
    state = torch.randn(2, 3, 4, generator=g).requires_grad_() if from_state else None
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1, -1, 2, 2, -1], [-1, -1, 3, 3, 3, 3, 3, 3, 3, 3, -1, -1]])
    if from_state:
        raw = conv_triton.causal_conv1d_triton_from_state(x, w, b, "silu", state, seq_idx)
    else:
        raw = conv_triton.causal_conv1d_triton(x, w, b, "silu", seq_idx=seq_idx)
    assert bool((raw.masked_select(seq_idx[:, None] < 0) != 0).any())  # the kernel alone does not zero them
    y = zero_padding(raw, seq_idx)
    params = [x, w, b] + ([state] if from_state else [])
    p64 = [p.detach().double().requires_grad_() for p in params]
    want = causal_conv1d_fn(p64[0], p64[1], p64[2], "silu", p64[3] if from_state else None, seq_idx)
    assert rel_err(y, want) <= 1e-6 and bool((y.masked_select(seq_idx[:, None] < 0) == 0).all())
    gy = torch.randn(want.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((y.double() * gy).sum(), params)
    for a, r in zip(got, torch.autograd.grad((want * gy).sum(), p64)):
        assert rel_err(a, r) <= 1e-5
