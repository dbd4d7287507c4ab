"""The fused Mamba-3 SISO decoding step (`mamba3_step(..., backend="triton")`, mambakit.ops.mamba3.triton_step) on
the CPU interpreter, against the PyTorch step in float64: several consecutive steps from random states on awkward
shapes (headdim 5 / 16, d_state 6 / 16 / 7, rope fraction 0.5 and 1.0, groups, no D, no gate, headdim blocks that
do not divide headdim), strided inputs and states, a NaN row kept to itself, a bfloat16 V, the layer's step loop
through the kernel equal to its forward, and the errors."""
from __future__ import annotations

import functools
import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU interpreter

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from mambakit.errors import MambaKitError  # noqa: E402
from mambakit.ops.mamba3 import mamba3_step  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.ops.mamba3.helpers import angle_err  # noqa: E402
from tests.ops.triton import interpreted_module  # noqa: E402

kernels = interpreted_module("mambakit.ops.mamba3.triton_step")


def _inputs(g, batch, nheads, ngroups, headdim, d_state, n_angles, with_D=True, gate=True):
    """One step's float64 arguments (after states): dt in (0, ~2), A*dt < 0, angles large enough to wrap 2 pi."""
    def r(*s, scale=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * scale
    DT = torch.nn.functional.softplus(r(batch, nheads))
    return dict(Q=r(batch, ngroups, d_state), K=r(batch, ngroups, d_state), V=r(batch, nheads, headdim),
                ADT=-torch.rand(batch, nheads, generator=g, dtype=torch.float64) * DT, DT=DT, Trap=r(batch, nheads),
                Q_bias=r(nheads, d_state), K_bias=r(nheads, d_state), Angles=r(batch, nheads, n_angles, scale=2.0),
                D=r(nheads) if with_D else None, Z=r(batch, nheads, headdim) if gate else None)


def _states(g, batch, nheads, headdim, d_state, n_angles):
    return (torch.rand(batch, nheads, n_angles, generator=g, dtype=torch.float64) * 2 * math.pi,
            torch.randn(batch, nheads, headdim, d_state, generator=g, dtype=torch.float64),
            torch.randn(batch, nheads, d_state, generator=g, dtype=torch.float64),
            torch.randn(batch, nheads, headdim, generator=g, dtype=torch.float64))


def _f32(kw):
    return {k: None if v is None else v.float() for k, v in kw.items()}


def _assert_states(out, ref, tol):
    assert angle_err(out[0], ref[0]) < tol
    for a, b in zip(out[1:], ref[1:]):
        assert rel_err(a, b) < tol


CASES = {  # batch, nheads, ngroups, headdim, d_state, n_angles, D, gate, block_p (0: the default)
    "p5_n6_half_g1": (1, 3, 1, 5, 6, 1, True, True, 0),
    "p5_n6_full_g3_b4": (4, 3, 3, 5, 6, 3, True, True, 0),
    "p16_n16_half_g3_noD": (4, 3, 3, 16, 16, 4, False, True, 0),
    "p16_n16_full_g1_nogate": (1, 3, 1, 16, 16, 8, True, False, 0),
    "p5_n7_odd_blocks2": (2, 3, 1, 5, 7, 3, True, True, 2),
    "p16_n6_blocks4_noD_nogate": (4, 3, 3, 16, 6, 1, False, False, 4),
}


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_float64_step(case):
    batch, nheads, ngroups, headdim, d_state, n_angles, with_D, gate, block_p = CASES[case]
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    st64 = _states(g, batch, nheads, headdim, d_state, n_angles)
    st32 = tuple(s.float() for s in st64)
    for _ in range(4):
        kw = _inputs(g, batch, nheads, ngroups, headdim, d_state, n_angles, with_D, gate)
        ref = mamba3_step(st64, **kw, backend="torch")
        if block_p:
            out = kernels.mamba3_step_triton(st32, **_f32(kw), block_p=block_p)
        else:
            out = mamba3_step(st32, **_f32(kw), backend="triton")
        assert out.dtype == torch.float32 and out.shape == (batch, nheads, headdim)
        assert rel_err(out, ref) < 1e-5
        _assert_states(st32, st64, 1e-5)
        assert all(s.dtype == torch.float32 for s in st32)


def test_strided_inputs_and_states():
    """Inputs as the layer hands them (slices of sequence-shaped tensors, a head-broadcast Angles, (batch, nheads)
    slices of (batch, nheads, seqlen)) and states that are views into larger tensors."""
    batch, nheads, ngroups, headdim, d_state, n_angles = 3, 4, 2, 6, 10, 5
    g = torch.Generator().manual_seed(3)
    kw = _inputs(g, batch, nheads, ngroups, headdim, d_state, n_angles)
    wide = {k: torch.randn(batch, 3, *v.shape[1:], generator=g, dtype=torch.float64) for k, v in kw.items()
            if k in ("Q", "K", "V", "Z")}
    for k, v in wide.items():
        v[:, 1] = kw[k]
        kw[k] = v[:, 1]
    for k in ("ADT", "DT", "Trap"):
        kw[k] = torch.stack([kw[k] * 0 + 7, kw[k]], dim=-1)[..., 1]
    kw["Angles"] = kw["Angles"][:, :1].expand(batch, nheads, n_angles)
    kw["Q_bias"] = torch.randn(d_state, nheads, generator=g, dtype=torch.float64).t()
    st64 = _states(g, batch, nheads, headdim, d_state, n_angles)
    big = tuple(torch.zeros(*s.shape[:-1], s.shape[-1] + 3) for s in st64)
    st32 = tuple(b[..., 1:1 + s.shape[-1]] for b, s in zip(big, st64))
    for a, s in zip(st32, st64):
        a.copy_(s)
    assert not any(s.is_contiguous() for s in st32) and not kw["Q"].is_contiguous()
    ref = mamba3_step(st64, **kw, backend="torch")
    out = mamba3_step(st32, **_f32(kw), backend="triton")
    assert rel_err(out, ref) < 1e-5
    _assert_states(st32, st64, 1e-5)
    for b in big:  # the padding around the views untouched
        assert not b[..., 0].any() and not b[..., -2:].any()


def test_nan_row_stays_in_its_row():
    batch, nheads, ngroups, headdim, d_state, n_angles = 3, 3, 1, 5, 6, 3
    g = torch.Generator().manual_seed(5)
    kw = _f32(_inputs(g, batch, nheads, ngroups, headdim, d_state, n_angles))
    kw["V"][1, 0, 0] = float("nan")
    states = tuple(s.float() for s in _states(g, batch, nheads, headdim, d_state, n_angles))
    ref_states = tuple(s.clone() for s in states)
    y = mamba3_step(states, **kw, backend="triton")
    y_ref = mamba3_step(ref_states, **kw, backend="torch")
    keep = [0, 2]
    assert torch.isnan(y[1, 0, 0]) and torch.isfinite(y[keep]).all()
    for a, b in zip((y, *states), (y_ref, *ref_states)):  # NaN exactly where the PyTorch step has it
        assert torch.isfinite(a[keep]).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_bfloat16_v_and_gate():
    """y in V's dtype; the states stay float32; the same values as the PyTorch step fed the same inputs."""
    batch, nheads, ngroups, headdim, d_state, n_angles = 2, 3, 3, 16, 16, 4
    g = torch.Generator().manual_seed(7)
    kw = _f32(_inputs(g, batch, nheads, ngroups, headdim, d_state, n_angles))
    for k in ("Q", "K", "V", "Z", "Trap"):
        kw[k] = kw[k].bfloat16()
    states = tuple(s.float() for s in _states(g, batch, nheads, headdim, d_state, n_angles))
    ref_states = tuple(s.clone() for s in states)
    y = mamba3_step(states, **kw, backend="triton")
    y_ref = mamba3_step(ref_states, **kw, backend="torch")
    assert y.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in states)
    assert rel_err(y, y_ref) < 1e-2
    _assert_states(states, ref_states, 1e-5)


LAYER_CONFIGS = [dict(headdim=8), dict(headdim=16, ngroups=2, rope_fraction=1.0),
                 dict(headdim=4, A_activation="softplus", is_outproj_norm=True), dict(headdim=6, d_state=7, expand=3)]


@pytest.mark.parametrize("kwargs", LAYER_CONFIGS)
def test_layer_step_loop_through_kernel_equals_forward(kwargs, monkeypatch):
    import mambakit.layers.mamba3 as layer_module
    from tests.layers.test_mamba3 import _layer, forward_and_step_loop

    calls = []

    def forced(*args, **kw):
        calls.append(1)
        return mamba3_step(*args, **kw, backend="triton")

    monkeypatch.setattr(layer_module, "mamba3_step", forced)
    m = _layer(dtype=torch.float32, **kwargs)
    x = torch.randn(3, 12, 32)
    full, steps, state = forward_and_step_loop(m, x)
    reference = m.allocate_state(3)
    with torch.no_grad():
        m(x, state=reference)
    assert len(calls) == 12
    assert rel_err(steps, full) < 1e-5
    _assert_states(state.parts(), reference.parts(), 1e-5)


def test_errors():
    g = torch.Generator().manual_seed(0)
    kw = _inputs(g, 2, 3, 1, 5, 6, 1)
    st = _states(g, 2, 3, 5, 6, 1)
    with pytest.raises(MambaKitError, match="backend must be one of"):
        mamba3_step(st, **kw, backend="ssd")
    with pytest.raises(MambaKitError, match="computes in float32"):
        mamba3_step(st, **kw, backend="triton")
    kw32, st32 = _f32(kw), tuple(s.float() for s in st)
    kw32["V"].requires_grad_(True)
    with pytest.raises(MambaKitError, match="inference only"):
        mamba3_step(st32, **kw32, backend="triton")
    with torch.no_grad():
        mamba3_step(st32, **kw32, backend="triton")
    kw32["V"].requires_grad_(False)
    with pytest.raises(MambaKitError, match="block_p must be 0 or a power of two"):
        kernels.mamba3_step_triton(st32, **kw32, block_p=3)
    with pytest.raises(MambaKitError, match="states.ssm must have shape"):
        mamba3_step((st32[0], st32[1][..., :-1], st32[2], st32[3]), **kw32, backend="triton")


def test_auto_takes_pytorch_off_cuda_and_for_grad():
    """"auto" on CPU tensors (and while an input requires grad) is the differentiable PyTorch step."""
    g = torch.Generator().manual_seed(1)
    kw = _f32(_inputs(g, 2, 3, 1, 5, 6, 1))
    kw["V"].requires_grad_(True)
    st = tuple(s.float() for s in _states(g, 2, 3, 5, 6, 1))
    y = functools.partial(mamba3_step, backend="auto")(st, **kw)
    assert y.requires_grad


def test_kernel_compiles_for_sm90_without_spills():
    """The interpreter compiles nothing: build the kernel for Hopper (no GPU needed) at the 130M head (headdim 64,
    d_state 128, bfloat16 activations, float32 states) with the default blocks and with the whole head in one tile,
    and read its resource usage: no local memory (no register spills)."""
    from tests.ops.triton import sm90_resource_usage

    bf16 = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "trap_ptr", "z_ptr", "y_ptr")}
    fixed = dict(HAS_D=True, HAS_Z=True, NP=128, PP=64)
    usage = sm90_resource_usage("mambakit.ops.mamba3.triton_step", "_mamba3_step_kernel", "*fp32", {
        "default": (bf16, dict(fixed, BLOCK_P=kernels.default_block_p(64, 128))),
        "whole_head_8_warps": (bf16, dict(fixed, BLOCK_P=64, num_warps=8)),
    })
    if usage is None:
        pytest.skip("this Triton's compile API differs")
    for name, line in usage.items():
        assert "REG:" in line and "LOCAL:0" in line and "STACK:0" in line, f"{name}: {line}"
