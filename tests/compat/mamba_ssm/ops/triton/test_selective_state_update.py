"""selective_state_update of mambakit.compat, both official layouts, against a float64 step written here.
Tolerances: the official tests' (float32 rtol 3e-4, atol 1e-3; bfloat16 rtol 1e-2, atol 5e-2)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.compat.mamba_ssm.ops.triton.selective_state_update import selective_state_update
from mambakit.errors import MambaKitError

TOL = dict(rtol=3e-4, atol=1e-3)


def step64(state, x, dt, A, B, C, D, z, dt_bias, softplus=True):
    """Heads layout, float64: returns (out, new_state)."""
    state, x, dt, A = state.double(), x.double(), dt.double(), A.double()
    dt = dt + dt_bias.double()
    dt = F.softplus(dt) if softplus else dt
    reps = state.shape[1] // B.shape[1]
    Bh = B.double().repeat_interleave(reps, 1)[:, :, None]
    Ch = C.double().repeat_interleave(reps, 1)[:, :, None]
    new = state * torch.exp(dt[..., None] * A) + (dt * x)[..., None] * Bh
    out = (new * Ch).sum(-1) + x * D.double()
    return out * F.silu(z.double()), new


def heads_inputs(batch=3, nheads=4, headdim=5, dstate=6, ngroups=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    state = r(batch, nheads, headdim, dstate).to(dtype)
    x, z = r(batch, nheads, headdim).to(dtype), r(batch, nheads, headdim).to(dtype)
    dt = r(batch, nheads)[..., None].expand(-1, -1, headdim).to(dtype)  # per head, stride 0 over headdim
    A = (-torch.rand(nheads, generator=g) - 0.5)[:, None, None].expand(-1, headdim, dstate)
    B, C = r(batch, ngroups, dstate).to(dtype), r(batch, ngroups, dstate).to(dtype)
    D = r(nheads)[:, None].expand(-1, headdim)
    dt_bias = r(nheads)[:, None].expand(-1, headdim)
    return state, x, dt, A, B, C, D, z, dt_bias


def test_mamba2_heads_layout_with_stride0_headdim():
    state, x, dt, A, B, C, D, z, dt_bias = heads_inputs()
    assert dt.stride(-1) == 0 and A.stride(-1) == 0
    want, want_state = step64(state, x, dt, A, B, C, D, z, dt_bias)
    out = selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    assert out.shape == x.shape
    torch.testing.assert_close(out.double(), want, **TOL)
    torch.testing.assert_close(state.double(), want_state, **TOL)


def test_mamba1_layout():
    g = torch.Generator().manual_seed(1)
    batch, dim, dstate = 2, 7, 5
    state = torch.randn(batch, dim, dstate, generator=g)
    x, dt, z = (torch.randn(batch, dim, generator=g) for _ in range(3))
    A = -torch.rand(dim, dstate, generator=g) - 0.5
    B, C = torch.randn(batch, dstate, generator=g), torch.randn(batch, dstate, generator=g)
    D, dt_bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    want, want_state = step64(state[:, None], x[:, None], dt[:, None], A[None], B[:, None], C[:, None], D[None],
                              z[:, None], dt_bias[None])
    out = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True)
    assert out.shape == (batch, dim)
    torch.testing.assert_close(out.double(), want[:, 0], **TOL)
    torch.testing.assert_close(state.double(), want_state[:, 0], **TOL)


def test_state_batch_indices_and_padding():
    state, x, dt, A, B, C, D, z, dt_bias = heads_inputs(seed=2)
    pool = torch.randn(5, *state.shape[1:])
    before = pool.clone()
    idx = torch.tensor([3, -1, 0], dtype=torch.int32)
    out = selective_state_update(pool, x, dt, A, B, C, D, z, dt_bias, True, state_batch_indices=idx)
    for row, slot in ((0, 3), (2, 0)):
        want, want_state = step64(before[slot:slot + 1], x[row:row + 1], dt[row:row + 1], A, B[row:row + 1],
                                  C[row:row + 1], D, z[row:row + 1], dt_bias)
        torch.testing.assert_close(out[row:row + 1].double(), want, **TOL)
        torch.testing.assert_close(pool[slot:slot + 1].double(), want_state, **TOL)
    assert bool((out[1] == 0).all())
    assert torch.equal(pool[[1, 2, 4]], before[[1, 2, 4]])


def test_bfloat16_state_is_updated_in_float32():
    state, x, dt, A, B, C, D, z, dt_bias = heads_inputs(dtype=torch.bfloat16, seed=3)
    want, want_state = step64(state, x, dt, A, B, C, D, z, dt_bias)
    out = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    # one rounding to bfloat16 at the end: the stored state is the float64 value rounded
    torch.testing.assert_close(state, want_state.to(torch.bfloat16), rtol=0, atol=0.0)
    torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=5e-2)


def test_shape_errors_name_the_argument():
    state, x, dt, A, B, C, D, z, dt_bias = heads_inputs()
    with pytest.raises(MambaKitError, match="dt_bias"):
        selective_state_update(state, x, dt, A, B, C, D, z, dt_bias[:, :2], True)
