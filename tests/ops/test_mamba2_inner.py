"""Mamba-2's inner path as one op (mambakit.ops.mamba2_inner): the composition with the chunked SSD against the one
with the sequential recurrence (float64, output and every gradient), and the layer's own forward as the reference
of the op's contract."""
from __future__ import annotations

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.layers.mamba2 import Mamba2
from mambakit.ops.mamba2_inner import mamba2_inner
from tests.conftest import rel_err


def make_inner2(batch=2, seqlen=13, nheads=4, headdim=4, ngroups=2, d_state=5, d_model=7, width=4,
                dtype=torch.float64, seed=0, bias=True, D_hdim=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    zxbcdt = r(batch, seqlen, d_inner + conv_dim + nheads, scale=0.7)
    kw = dict(conv_weight=r(conv_dim, width, scale=0.5), conv_bias=r(conv_dim, scale=0.1) if bias else None,
              dt_bias=r(nheads, scale=0.3),
              A=(-torch.rand(nheads, generator=g, dtype=torch.float64) - 0.3).to(dtype).requires_grad_(),
              D=r(nheads, headdim) if D_hdim else r(nheads), norm_weight=(1 + r(d_inner, scale=0.2)).detach()
              .requires_grad_(), out_weight=r(d_model, d_inner, scale=0.4),
              out_bias=r(d_model, scale=0.1) if bias else None)
    return zxbcdt, kw, dict(headdim=headdim, ngroups=ngroups)


def grads_of2(zxbcdt, kw, **extra):
    out = mamba2_inner(zxbcdt, **kw, **extra)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    leaves = [zxbcdt] + [v for v in kw.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    return out, torch.autograd.grad((out.double() * w).sum(), leaves)


@pytest.mark.parametrize("opts", [dict(), dict(norm_before_gate=True, bias=False),
                                  dict(D_hdim=True, dt_limit=(0.05, 0.9)), dict(ngroups=1, seqlen=1)])
def test_composition_matches_the_recurrence_float64(opts):
    limit = opts.pop("dt_limit", (0.0, float("inf")))
    nbg = opts.pop("norm_before_gate", False)
    zxbcdt, kw, dims = make_inner2(**opts)
    extra = dict(dims, chunk_size=4, norm_before_gate=nbg, dt_limit=limit)
    out, grads = grads_of2(zxbcdt, kw, backend="torch", **extra)
    ref, ref_grads = grads_of2(zxbcdt, kw, backend="ref", **extra)
    assert rel_err(out, ref) < 1e-10
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-10


def test_the_op_is_the_layers_inner_path():
    torch.manual_seed(0)
    layer = Mamba2(16, d_state=5, headdim=4, ngroups=2, chunk_size=8, dtype=torch.float64)
    h = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        out = mamba2_inner(layer.in_proj(h), layer.conv1d.weight, layer.conv1d.bias, layer.dt_bias,
                           -torch.exp(layer.A_log), layer.D, layer.norm.weight, layer.out_proj.weight,
                           layer.out_proj.bias, headdim=4, ngroups=2, chunk_size=8, eps=layer.norm.eps,
                           norm_before_gate=layer.norm.norm_before_gate, dt_limit=layer.dt_limit)
        assert rel_err(out, layer(h)) < 1e-10  # another chunking: float64 rounding only


def test_bad_shapes_are_named():
    zxbcdt, kw, dims = make_inner2()
    with pytest.raises(MambaKitError, match="zxbcdt's last dim"):
        mamba2_inner(zxbcdt[..., :-1], **kw, **dims)
    with pytest.raises(MambaKitError, match="norm_weight"):
        mamba2_inner(zxbcdt, **{**kw, "norm_weight": kw["norm_weight"][:-1]}, **dims)
    with pytest.raises(MambaKitError, match="seq_idx"):
        mamba2_inner(zxbcdt, **kw, **dims, seq_idx=torch.zeros(2, 3, dtype=torch.long))


def test_A_log_in_place_of_A():
    # the composition forms A = -exp(A_log) (float64 here): the A form's output, and A_log's gradient by the chain
    zxbcdt, kw, dims = make_inner2()
    A_log = torch.log(-kw.pop("A")).detach().requires_grad_()
    extra = dict(dims, chunk_size=4, backend="torch")
    out = mamba2_inner(zxbcdt, **kw, A=None, A_log=A_log, **extra)
    want = mamba2_inner(zxbcdt, **kw, A=-torch.exp(A_log), **extra)
    assert torch.equal(out, want)
    g, = torch.autograd.grad(out.sum(), A_log)
    g_want, = torch.autograd.grad(want.sum(), A_log)
    assert torch.equal(g, g_want) and g.abs().sum() > 0
    with pytest.raises(MambaKitError, match="exactly one of A and A_log, got both"):
        mamba2_inner(zxbcdt, **kw, A=-torch.exp(A_log), A_log=A_log, **extra)
    with pytest.raises(MambaKitError, match="exactly one of A and A_log, got neither"):
        mamba2_inner(zxbcdt, **kw, A=None, **extra)
    with pytest.raises(MambaKitError, match="A_log must have shape"):
        mamba2_inner(zxbcdt, **kw, A=None, A_log=A_log[None], **extra)
