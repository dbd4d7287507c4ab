"""Mamba-1's inner path op on the CPU: the composition with the chunked scan against the sequential scan (float64),
the official conv weight shape, and the argument checks."""
from __future__ import annotations

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.ops.mamba_inner import mamba_inner
from tests.conftest import rel_err


def make_inner(batch=2, d_inner=6, d_state=3, rank=2, d_model=5, seqlen=11, width=4, dtype=torch.float64, seed=0,
               bias=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    # xz as the transposed view of an in_proj output (batch, seqlen, 2 * d_inner), as the Mamba block makes it
    xz = (torch.randn(batch, seqlen, 2 * d_inner, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    xz = xz.requires_grad_()
    kw = dict(conv1d_weight=r(d_inner, width, scale=0.5), conv1d_bias=r(d_inner, scale=0.1) if bias else None,
              x_proj_weight=r(rank + 2 * d_state, d_inner, scale=0.4), delta_proj_weight=r(d_inner, rank, scale=0.5),
              out_proj_weight=r(d_model, d_inner, scale=0.4), out_proj_bias=r(d_model, scale=0.1) if bias else None,
              A=(-torch.rand(d_inner, d_state, generator=g, dtype=torch.float64) - 0.2).to(dtype).requires_grad_(),
              D=r(d_inner), delta_bias=r(d_inner, scale=0.3))
    return xz, kw


def grads_of(fn, xz, kw, **extra):
    out = fn(xz.transpose(1, 2), **kw, **extra)
    g = torch.Generator().manual_seed(9)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    leaves = [xz] + [v for v in kw.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad((out.double() * w).sum(), leaves)
    return out, grads


@pytest.mark.parametrize("bias", [True, False])
def test_composition_matches_sequential_reference_float64(bias):
    xz, kw = make_inner(bias=bias)
    out, grads = grads_of(mamba_inner, xz, kw, backend="torch")
    ref, ref_grads = grads_of(mamba_inner, xz, kw, backend="ref")
    assert out.shape == (2, 11, 5)
    assert rel_err(out, ref) < 1e-10
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-10


def test_official_conv_weight_shape_and_seq_idx():
    xz, kw = make_inner(seqlen=9)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    a = mamba_inner(xz.transpose(1, 2), **kw, seq_idx=seq_idx, backend="ref")
    kw3 = dict(kw, conv1d_weight=kw["conv1d_weight"][:, None])
    b = mamba_inner(xz.transpose(1, 2), **kw3, seq_idx=seq_idx, backend="torch")
    assert rel_err(a, b) < 1e-10
    # the second packed sequence of row 0 does not see the first
    tail = mamba_inner(xz[:1, 4:].transpose(1, 2), **kw, backend="ref")
    assert rel_err(a[:1, 4:], tail) < 1e-10


def test_bad_arguments_name_themselves(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU is refused outside the interpreter
    xz, kw = make_inner()
    with pytest.raises(MambaKitError, match="xz must be"):
        mamba_inner(xz[:, :, :5].transpose(1, 2), **kw)
    with pytest.raises(MambaKitError, match="x_proj_weight must have shape"):
        mamba_inner(xz.transpose(1, 2), **dict(kw, x_proj_weight=kw["x_proj_weight"][:-1]))
    with pytest.raises(MambaKitError, match="backend"):
        mamba_inner(xz.transpose(1, 2), **kw, backend="cuda")
    with pytest.raises(MambaKitError, match="needs CUDA"):
        mamba_inner(xz.float().transpose(1, 2), **kw, backend="triton")


def test_A_log_in_place_of_A():
    # the composition forms A = -exp(A_log) (float64 here): the A form's output, and A_log's gradient by the chain
    xz, kw = make_inner()
    A_log = torch.log(-kw.pop("A")).detach().requires_grad_()
    out = mamba_inner(xz.transpose(1, 2), **kw, A=None, A_log=A_log, backend="torch")
    want = mamba_inner(xz.transpose(1, 2), **kw, A=-torch.exp(A_log), backend="torch")
    assert torch.equal(out, want)
    g, = torch.autograd.grad(out.sum(), A_log)
    g_want, = torch.autograd.grad(want.sum(), A_log)
    assert torch.equal(g, g_want) and g.abs().sum() > 0
    with pytest.raises(MambaKitError, match="exactly one of A and A_log, got both"):
        mamba_inner(xz.transpose(1, 2), **kw, A=-torch.exp(A_log), A_log=A_log)
    with pytest.raises(MambaKitError, match="exactly one of A and A_log, got neither"):
        mamba_inner(xz.transpose(1, 2), **kw, A=None)
    with pytest.raises(MambaKitError, match="A_log must have shape"):
        mamba_inner(xz.transpose(1, 2), **kw, A=None, A_log=A_log[:-1])
