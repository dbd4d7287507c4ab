"""The lean PyTorch mixer steps (`backend="torch"`, the CPU path) against the composition of the single-purpose
ops (`backend="ref"`) in float64: several steps on fresh random inputs of awkward shapes, the states updated in
place alike; a dt transform; a caller-kept A; `linear_step` against F.linear."""
from __future__ import annotations

import pytest
import torch

from mambakit.ops import cpu_linear
import torch.nn.functional as F

from mambakit.ops.cpu_linear import fp32_accumulation_available
from mambakit.ops.mixer_step import linear_step, mamba1_step, mamba2_step
from tests.conftest import rel_err


def _r(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("batch,d_inner,d_state,dt_rank,with_D", [(3, 37, 5, 7, True), (1, 64, 16, 4, False)])
@pytest.mark.parametrize("pass_A", [False, True])
def test_mamba1_lean_step_matches_reference(batch, d_inner, d_state, dt_rank, with_D, pass_A):
    g = torch.Generator().manual_seed(d_inner + pass_A)
    A_log = torch.log(torch.rand(d_inner, d_state, generator=g, dtype=torch.float64) * 4 + 0.5)
    p = dict(conv_weight=_r(g, d_inner, 4, scale=0.5), conv_bias=_r(g, d_inner, scale=0.3),
             x_proj_weight=_r(g, dt_rank + 2 * d_state, d_inner, scale=d_inner ** -0.5),
             dt_proj_weight=_r(g, d_inner, dt_rank, scale=dt_rank ** -0.5), dt_proj_bias=_r(g, d_inner) - 2,
             A_log=A_log, D=_r(g, d_inner) if with_D else None)
    states = [(_r(g, batch, d_inner, 4), _r(g, batch, d_inner, d_state))]
    states.append(tuple(t.clone() for t in states[0]))
    for _ in range(3):
        xz = _r(g, batch, 2 * d_inner)
        ref = mamba1_step(xz, *states[0], **p, backend="ref")
        out = mamba1_step(xz, *states[1], **p, backend="torch", A=-torch.exp(A_log) if pass_A else None)
        assert rel_err(out, ref) < 1e-12
        for a, b in zip(states[0], states[1]):
            assert rel_err(b, a) < 1e-12


@pytest.mark.parametrize("nheads,headdim,d_state,ngroups,per_channel_D,dt_limit,gate", [
    (6, 12, 10, 2, False, (0.0, float("inf")), False),
    (4, 8, 16, 1, True, (0.01, 0.05), True),
    (6, 5, 7, 3, False, (0.0, float("inf")), True),
])
def test_mamba2_lean_step_matches_reference(nheads, headdim, d_state, ngroups, per_channel_D, dt_limit, gate):
    g = torch.Generator().manual_seed(nheads * headdim + d_state)
    batch, d_inner = 2, nheads * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    p = dict(conv_weight=_r(g, conv_dim, 4, scale=0.5), conv_bias=_r(g, conv_dim, scale=0.3),
             dt_bias=_r(g, nheads, scale=0.5) - 2,
             A_log=torch.log(torch.rand(nheads, generator=g, dtype=torch.float64) * 8 + 1),
             D=_r(g, d_inner if per_channel_D else nheads))
    kw = dict(ngroups=ngroups, dt_limit=dt_limit, gate=gate, dt_transform=lambda dt: 0.5 * dt + 0.1)
    s_ref = (_r(g, batch, conv_dim, 4), _r(g, batch, nheads, headdim, d_state))
    s_out = tuple(t.clone() for t in s_ref)
    for _ in range(3):
        zx = _r(g, batch, d_inner + conv_dim + nheads)
        ref = mamba2_step(zx, *s_ref, **p, **kw, backend="ref")
        out = mamba2_step(zx, *s_out, **p, **kw, backend="torch", A=-torch.exp(p["A_log"]) if gate else None)
        assert rel_err(out, ref) < 1e-12
        for a, b in zip(s_ref, s_out):
            assert rel_err(b, a) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_linear_step_equals_linear(dtype, batch):
    g = torch.Generator().manual_seed(batch)
    x, w, b = torch.randn(batch, 96, generator=g), torch.randn(200, 96, generator=g), torch.randn(200, generator=g)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    ref = F.linear(x.double(), w.double(), b.double())
    out = linear_step(x, w, b)
    # a bfloat16 weight on the CPU accumulates and returns float32 (mambakit.ops.cpu_linear) where fbgemm exists and
    # that product is switched on
    fp32_out = dtype == torch.float32 or (cpu_linear.ENABLED and fp32_accumulation_available())
    assert out.dtype == (torch.float32 if fp32_out else dtype) and out.shape == (batch, 200)
    assert rel_err(out, ref) < (1e-6 if fp32_out else 1e-2)


def test_mamba2_lean_step_on_a_non_contiguous_state():
    """A state laid out (batch, nheads, d_state, headdim) in memory takes the per-head read-out, not the one product
    per group over the flat state; the same values."""
    g = torch.Generator().manual_seed(7)
    batch, nheads, headdim, d_state, ngroups = 3, 4, 6, 5, 2
    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    p = dict(conv_weight=_r(g, conv_dim, 4, scale=0.5), conv_bias=_r(g, conv_dim, scale=0.3),
             dt_bias=_r(g, nheads, scale=0.5) - 2,
             A_log=torch.log(torch.rand(nheads, generator=g, dtype=torch.float64) * 8 + 1), D=_r(g, nheads),
             ngroups=ngroups)
    s_ref = (_r(g, batch, conv_dim, 4), _r(g, batch, nheads, headdim, d_state))
    s_out = (s_ref[0].clone(), s_ref[1].transpose(-1, -2).contiguous().transpose(-1, -2))
    assert not s_out[1].is_contiguous()
    for _ in range(2):
        zx = _r(g, batch, d_inner + conv_dim + nheads)
        ref = mamba2_step(zx, *s_ref, **p, backend="ref")
        out = mamba2_step(zx, *s_out, **p, backend="torch")
        assert rel_err(out, ref) < 1e-12
        for a, b in zip(s_ref, s_out):
            assert rel_err(b, a) < 1e-12


def test_bad_shapes_name_the_argument():
    from mambakit.errors import MambaKitError

    batch, d_inner, d_state, dt_rank = 2, 8, 4, 3
    p = dict(conv_weight=torch.randn(d_inner, 4), conv_bias=torch.randn(d_inner),
             x_proj_weight=torch.randn(dt_rank + 2 * d_state, d_inner), dt_proj_weight=torch.randn(d_inner, dt_rank),
             dt_proj_bias=torch.randn(d_inner), A_log=torch.randn(d_inner, d_state), D=torch.randn(d_inner))
    states = (torch.zeros(batch, d_inner, 4), torch.zeros(batch, d_inner, d_state))
    mamba1_step(torch.randn(batch, 2 * d_inner), *states, **p, backend="torch")  # the right shapes pass
    for name, bad in (("D", torch.randn(d_inner + 1)), ("x_proj_weight", torch.randn(dt_rank, d_inner)),
                      ("conv_bias", torch.randn(1))):
        with pytest.raises(MambaKitError, match=rf"{name} must have shape .*got"):
            mamba1_step(torch.randn(batch, 2 * d_inner), *states, **{**p, name: bad}, backend="torch")
    with pytest.raises(MambaKitError, match=r"xz must have shape \(2, 16\), got \(2, 15\)"):
        mamba1_step(torch.randn(batch, 2 * d_inner - 1), *states, **p, backend="torch")
    nheads, headdim, ngroups = 2, 4, 1
    conv_dim = nheads * headdim + 2 * ngroups * d_state
    q = dict(conv_weight=torch.randn(conv_dim, 4), conv_bias=torch.randn(conv_dim), dt_bias=torch.randn(nheads),
             A_log=torch.randn(nheads), D=torch.randn(nheads), ngroups=ngroups)
    s2 = (torch.zeros(batch, conv_dim, 4), torch.zeros(batch, nheads, headdim, d_state))
    zx = torch.randn(batch, nheads * headdim + conv_dim + nheads)
    mamba2_step(zx, *s2, **q, backend="torch")
    with pytest.raises(MambaKitError, match=r"dt_bias must have shape \(2,\), got \(3,\)"):
        mamba2_step(zx, *s2, **{**q, "dt_bias": torch.randn(3)}, backend="torch")


def _rounded(state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return state.to(dtype).double()


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_16bit_state_steps_in_float32_and_rounds_once_per_token(arch, state_dtype):
    """A 16-bit SSM state: the lean step's arithmetic is float32 and the state is rounded once after each token,
    i.e. it follows the float64 composition whose state is rounded to the same dtype after every step (a step
    computed in 16 bits would be ~100x further off)."""
    g = torch.Generator().manual_seed(11 + (arch == "mamba2"))
    batch = 3
    if arch == "mamba1":
        d_inner, d_state, dt_rank = 37, 5, 7
        p = dict(conv_weight=_r(g, d_inner, 4, scale=0.5), conv_bias=_r(g, d_inner, scale=0.3),
                 x_proj_weight=_r(g, dt_rank + 2 * d_state, d_inner, scale=d_inner ** -0.5),
                 dt_proj_weight=_r(g, d_inner, dt_rank, scale=dt_rank ** -0.5), dt_proj_bias=_r(g, d_inner) - 2,
                 A_log=torch.log(torch.rand(d_inner, d_state, generator=g, dtype=torch.float64) * 4 + 0.5),
                 D=_r(g, d_inner))
        step, width, ssm_shape, kw = mamba1_step, 2 * d_inner, (batch, d_inner, d_state), {}
        conv_dim = d_inner
    else:
        nheads, headdim, d_state, ngroups = 6, 12, 10, 2
        d_inner = nheads * headdim
        conv_dim = d_inner + 2 * ngroups * d_state
        p = dict(conv_weight=_r(g, conv_dim, 4, scale=0.5), conv_bias=_r(g, conv_dim, scale=0.3),
                 dt_bias=_r(g, nheads, scale=0.5) - 2,
                 A_log=torch.log(torch.rand(nheads, generator=g, dtype=torch.float64) * 8 + 1), D=_r(g, nheads))
        step, width, ssm_shape = mamba2_step, d_inner + conv_dim + nheads, (batch, nheads, headdim, d_state)
        kw = dict(ngroups=ngroups, gate=True)
    conv64, ssm64 = _r(g, batch, conv_dim, 4), _rounded(_r(g, *ssm_shape), state_dtype)
    conv32, ssm16 = conv64.float(), ssm64.to(state_dtype)
    p32 = {k: None if v is None else v.float() for k, v in p.items()}
    for _ in range(4):
        xz = _r(g, batch, width)
        ref = step(xz, conv64, ssm64, **p, **kw, backend="ref")
        ssm64.copy_(_rounded(ssm64, state_dtype))
        out = step(xz.float(), conv32, ssm16, **p32, **kw, backend="torch")
        assert ssm16.dtype == state_dtype and out.dtype == torch.float32
        assert rel_err(out, ref) < 2e-5
        assert rel_err(ssm16, ssm64) < 2e-4  # a value within float32 rounding of a tie may round the other way
