"""The Triton causal conv1d (+ SiLU) against the torch version, forward and gradients, on the CPU interpreter."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch

from mambakit.errors import MambaKitError
from mambakit.ops.conv1d import causal_conv1d_fn
from tests.conftest import rel_err
from tests.ops.triton import interpreted_module

conv_triton = interpreted_module("mambakit.ops.conv1d.triton")
causal_conv1d_triton = conv_triton.causal_conv1d_triton


def _packed_idx(batch, seqlen, g):
    idx = torch.zeros(batch, seqlen, dtype=torch.int64)
    for b in range(batch):
        for c in torch.randint(1, max(seqlen, 2), (2,), generator=g).tolist():
            idx[b, c:] += 1
    return idx


@pytest.mark.parametrize("batch,dim,seqlen,width,activation,packed,channel_last,with_bias", [
    (1, 3, 1, 4, "silu", False, False, True),
    (2, 5, 17, 4, "silu", False, False, True),
    (2, 4, 40, 4, "silu", True, True, True),
    (1, 7, 23, 3, None, True, False, False),
    (2, 2, 9, 2, "swish", False, True, True),
    (1, 3, 5, 7, None, False, False, True),  # kernel wider than the sequence
])
def test_matches_torch(batch, dim, seqlen, width, activation, packed, channel_last, with_bias):
    g = torch.Generator().manual_seed(seqlen * 13 + dim)
    x = (torch.randn(batch, seqlen, dim, generator=g).transpose(1, 2) if channel_last
         else torch.randn(batch, dim, seqlen, generator=g)).requires_grad_()
    w = torch.randn(dim, width, generator=g).requires_grad_()
    b = torch.randn(dim, generator=g).requires_grad_() if with_bias else None
    seq = _packed_idx(batch, seqlen, g) if packed else None
    y = causal_conv1d_triton(x, w, b, activation, seq_idx=seq)
    params = [x, w] + ([b] if with_bias else [])
    p64 = [p.detach().double().requires_grad_() for p in params]
    yr = causal_conv1d_fn(p64[0], p64[1], p64[2] if with_bias else None, activation, seq_idx=seq)
    assert y.shape == yr.shape and y.dtype == x.dtype and rel_err(y, yr) <= 1e-5
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gt = torch.autograd.grad((y.double() * gy).sum(), params)
    gr = torch.autograd.grad((yr * gy).sum(), p64)
    for name, a, r in zip(("x", "weight", "bias"), gt, gr):
        assert a.shape == r.shape and rel_err(a, r) <= 1e-5, name


def test_bfloat16_and_determinism():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 21, generator=g).to(torch.bfloat16).requires_grad_()
    w = torch.randn(4, 4, generator=g).requires_grad_()
    b = torch.randn(4, generator=g).requires_grad_()
    gy = torch.randn(2, 4, 21, generator=g).to(torch.bfloat16)
    y1 = causal_conv1d_triton(x, w, b, "silu")
    g1 = torch.autograd.grad(y1, [x, w, b], gy)
    y2 = causal_conv1d_triton(x, w, b, "silu")
    g2 = torch.autograd.grad(y2, [x, w, b], gy)
    assert torch.equal(y1, y2) and all(torch.equal(a, c) for a, c in zip(g1, g2))
    yr = causal_conv1d_fn(x.detach().double(), w.detach().double(), b.detach().double(), "silu")
    assert y1.dtype == torch.bfloat16 and rel_err(y1, yr) <= 1e-2


def test_errors():
    x = torch.randn(1, 3, 5)
    with pytest.raises(MambaKitError, match="activation"):
        causal_conv1d_triton(x, torch.randn(3, 4), None, "relu")
    with pytest.raises(MambaKitError, match="weight"):
        causal_conv1d_triton(x, torch.randn(2, 4))
    with pytest.raises(MambaKitError, match="seq_idx"):
        causal_conv1d_triton(x, torch.randn(3, 4), seq_idx=torch.zeros(1, 4, dtype=torch.int64))


@pytest.mark.parametrize("batch,dim,seqlen,width,packed", [(2, 5, 17, 4, False), (3, 6, 9, 3, True),
                                                          (1, 4, 1, 4, False)])
def test_conv_continuing_a_state_matches_torch(batch, dim, seqlen, width, packed):
    """The prefill that continues a conv state (chunked prefill, a cache): forward and every gradient, conv_state's
    included, against the PyTorch path in float64."""
    g = torch.Generator().manual_seed(seqlen * dim)
    x = torch.randn(batch, dim, seqlen, generator=g, dtype=torch.float64, requires_grad=True)
    state = torch.randn(batch, dim, width, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(dim, width, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(dim, generator=g, dtype=torch.float64, requires_grad=True)
    seq = _packed_idx(batch, seqlen, g) if packed else None
    from mambakit.ops.conv1d.naive import causal_conv1d_torch

    ref = causal_conv1d_torch(x, w, b, "silu", state, seq)
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (x, state, w, b), gy)
    leaves = [t.detach().float().requires_grad_() for t in (x, state, w, b)]
    out = conv_triton.causal_conv1d_triton_from_state(leaves[0], leaves[2], leaves[3], "silu", leaves[1], seq)
    assert rel_err(out, ref) < 1e-5
    for got, want in zip(torch.autograd.grad(out, leaves, gy.float()), ref_grads):
        assert rel_err(got, want) < 1e-5


def test_conv_from_state_checks_the_state_shape():
    with pytest.raises(MambaKitError, match="conv_state"):
        conv_triton.causal_conv1d_triton_from_state(torch.zeros(1, 4, 5), torch.zeros(4, 4), None, "silu",
                                                    torch.zeros(1, 4, 3))
