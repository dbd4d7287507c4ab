"""The Triton one-token decode step against the torch version (in-place state update), on the CPU interpreter."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch

from mambakit.errors import MambaKitError
from mambakit.ops.selective_scan import selective_scan_ref, selective_state_update
from tests.conftest import rel_err
from tests.ops.triton import interpreted_module

upd_triton = interpreted_module("mambakit.ops.triton.state_update")
selective_state_update_triton = upd_triton.selective_state_update_triton


def _inputs(batch, dim, d_state, groups, g, with_D=True, with_z=True, with_bias=True):
    bc = (batch, d_state) if groups == 0 else (batch, groups, d_state)
    return dict(
        x=torch.randn(batch, dim, generator=g), dt=torch.randn(batch, dim, generator=g) * 0.5 - 1,
        A=-torch.rand(dim, d_state, generator=g) * 4 - 0.1, B=torch.randn(bc, generator=g),
        C=torch.randn(bc, generator=g),
        D=torch.randn(dim, generator=g) if with_D else None, z=torch.randn(batch, dim, generator=g) if with_z else None,
        dt_bias=torch.randn(dim, generator=g) * 0.3 if with_bias else None, dt_softplus=True)


@pytest.mark.parametrize("batch,dim,d_state,groups,flags", [
    (1, 1, 1, 0, {}),
    (2, 5, 3, 0, {}),
    (3, 8, 16, 2, {}),
    (2, 6, 7, 3, {"with_D": False, "with_z": False, "with_bias": False}),
])
def test_matches_torch_in_place(batch, dim, d_state, groups, flags):
    g = torch.Generator().manual_seed(batch * 100 + dim)
    kw = _inputs(batch, dim, d_state, groups, g, **flags)
    state = torch.randn(batch, dim, d_state, generator=g)
    ref_state = state.clone()
    y = selective_state_update_triton(state, **kw)
    yr = selective_state_update(ref_state, **kw)
    assert y.shape == (batch, dim) and y.dtype == kw["x"].dtype
    assert rel_err(y, yr) <= 1e-5 and rel_err(state, ref_state) <= 1e-5


def test_steps_continue_the_scan_and_strided_state():
    """Prefill with the scan, then decode steps with the kernel = one scan over the whole sequence."""
    g = torch.Generator().manual_seed(3)
    batch, dim, N, L = 2, 4, 4, 6
    u = torch.randn(batch, dim, L, generator=g, dtype=torch.float64)
    delta = torch.randn(batch, dim, L, generator=g, dtype=torch.float64) * 0.5 - 1
    A = -torch.rand(dim, N, generator=g, dtype=torch.float64) - 0.1
    f64 = dict(generator=g, dtype=torch.float64)
    B, C = torch.randn(batch, N, L, **f64), torch.randn(batch, N, L, **f64)
    D, z = torch.randn(dim, **f64), torch.randn(batch, dim, L, **f64)
    bias = torch.randn(dim, generator=g, dtype=torch.float64) * 0.3
    yfull = selective_scan_ref(u, delta, A, B, C, D, z, bias, True)
    _, state = selective_scan_ref(u[..., :3], delta[..., :3], A, B[..., :3], C[..., :3], D, z[..., :3], bias, True,
                                  return_last_state=True)
    big = torch.zeros(batch, dim, 2 * N, dtype=torch.float32)
    st = big[..., ::2]  # a strided state view is updated in place
    st.copy_(state)
    for t in range(3, L):
        y = selective_state_update_triton(st, u[..., t].float(), delta[..., t].float(), A.float(), B[..., t].float(),
                                          C[..., t].float(), D.float(), z[..., t].float(), bias.float(), True)
        assert rel_err(y, yfull[..., t]) <= 1e-5
    assert torch.all(big[..., 1::2] == 0)


def test_bfloat16_state():
    g = torch.Generator().manual_seed(1)
    kw = _inputs(2, 4, 8, 0, g)
    state32 = torch.randn(2, 4, 8, generator=g)
    state = state32.to(torch.bfloat16)
    ref = state.float()
    y = selective_state_update_triton(state, **kw)
    yr = selective_state_update(ref, **kw)
    assert state.dtype == torch.bfloat16 and rel_err(state, ref) <= 1e-2 and rel_err(y, yr) <= 1e-2


def test_errors():
    g = torch.Generator().manual_seed(0)
    kw = _inputs(1, 2, 3, 0, g)
    with pytest.raises(MambaKitError, match="A must"):
        selective_state_update_triton(torch.zeros(1, 2, 3), **{**kw, "A": torch.zeros(2, 4)})
    with pytest.raises(MambaKitError, match="x must"):
        selective_state_update_triton(torch.zeros(1, 2, 3), **{**kw, "x": torch.zeros(1, 3)})
    with pytest.raises(MambaKitError, match="B and C"):
        selective_state_update_triton(torch.zeros(1, 2, 3), **{**kw, "B": torch.zeros(1, 4)})
