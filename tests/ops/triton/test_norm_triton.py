"""The Triton (gated) RMSNorm against the PyTorch path in float64, run on the CPU through the Triton interpreter.

Forward and the gradients of y, z and weight in float32 (rel err <= 1e-5) on awkward shapes (rows not a multiple of
the block, d not a power of two, groups, batch 1, 3-D, z None, both gate orders, strided views); float16 inputs;
bit-identical gradients run after run; the layer dispatch; errors.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("triton")

import torch

from mambakit.errors import MambaKitError
from mambakit.layers import norm as norm_layer
from tests.conftest import rel_err
from tests.ops.triton import interpreted_module

tnorm = interpreted_module("mambakit.ops.norm.triton")

EPS = 1e-5

# name: (shape, group_size (None: d), with z, norm_before_gate)
CASES = {
    "rows_37_d96": ((37, 96), None, True, False),
    "d48_no_z": ((2, 19, 48), None, False, False),
    "groups_3x32": ((3, 5, 96), 32, True, False),
    "groups_3x32_norm_first": ((3, 5, 96), 32, True, True),
    "batch1_d48_norm_first": ((1, 1, 48), None, True, True),
    "groups_no_z": ((11, 96), 48, False, False),
    "rows_130_d40": ((130, 40), 8, True, False),
}


def _inputs(shape, with_z, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    z = torch.randn(shape, generator=g, dtype=torch.float64) * 2 if with_z else None
    w = 1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    gout = torch.randn(shape, generator=g, dtype=torch.float64)
    return y.to(dtype), (z.to(dtype) if with_z else None), w.float(), gout


def _reference(y, z, w, group_size, norm_before_gate):
    """RMSNormGated's PyTorch path in float64 (it computes in float64 for float64 inputs), with weight w."""
    layer = SimpleNamespace(weight=w, eps=EPS, group_size=group_size, norm_before_gate=norm_before_gate)
    return norm_layer.RMSNormGated.forward(layer, y, z)


def _grads(fn, y, z, w, gout):
    """fn(y, z, w) and the gradients of sum(fn * gout) w.r.t. y, z (if given) and w (leaf copies)."""
    y = y.detach().clone().requires_grad_()
    z = z.detach().clone().requires_grad_() if z is not None else None
    w = w.detach().clone().requires_grad_()
    out = fn(y, z, w)
    leaves = {"y": y, "z": z, "weight": w}
    leaves = {k: v for k, v in leaves.items() if v is not None}
    grads = torch.autograd.grad((out.double() * gout).sum(), list(leaves.values()))
    return out, dict(zip(leaves, grads))


def _compare(y, z, w, gout, group_size, norm_before_gate, tol):
    d = y.shape[-1]
    out, grads = _grads(lambda a, b, c: tnorm.rms_norm_gated_triton(a, b, c, EPS, group_size, norm_before_gate),
                        y, z, w, gout)
    ref, ref_grads = _grads(lambda a, b, c: _reference(a, b, c, group_size or d, norm_before_gate),
                            y.double(), z.double() if z is not None else None, w.double(), gout)
    assert out.dtype == y.dtype and out.shape == y.shape
    assert grads["weight"].dtype == w.dtype and grads["y"].dtype == y.dtype
    errors = {"out": rel_err(out, ref)}
    errors.update({f"d{k}": rel_err(grads[k], ref_grads[k]) for k in ref_grads})
    bad = {k: v for k, v in errors.items() if not v <= tol}  # NaN / inf never pass (rel_err gives inf)
    assert not bad, f"relative errors above {tol}: {bad}"
    return errors


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_reference(name):
    shape, group_size, with_z, nbg = CASES[name]
    y, z, w, gout = _inputs(shape, with_z, torch.float32)
    _compare(y, z, w, gout, group_size, nbg, tol=1e-5)


@pytest.mark.parametrize("nbg", [False, True])
def test_float16_inputs(nbg):
    """Half-precision y and z with a float32 weight (as under autocast): output and dy/dz in float16, dw float32."""
    y, z, w, gout = _inputs((3, 7, 96), True, torch.float16, seed=1)
    _compare(y, z, w, gout, 32, nbg, tol=1e-3)


def test_strided_views():
    """y and z as column slices of one (rows, 3d) buffer (row stride 3d, read in place), a transposed batch view
    (reshape copies) and a channel stride of 2 (copied)."""
    g = torch.Generator().manual_seed(2)
    buf = torch.randn(4, 9, 3 * 48, generator=g)
    y, z = buf[..., 5:53], buf[..., 60:108]
    _, _, w, gout = _inputs((4, 9, 48), True, torch.float32, seed=3)
    _compare(y, z, w, gout, 16, False, tol=1e-5)
    _compare(y.transpose(0, 1), z.transpose(0, 1), w, gout.transpose(0, 1), None, True, tol=1e-5)
    _compare(buf[..., 0:96:2], z, w, gout, 24, False, tol=1e-5)


def test_rms_norm_triton():
    y, _, w, gout = _inputs((2, 13, 48), False, torch.float32, seed=4)
    out, grads = _grads(lambda a, b, c: tnorm.rms_norm_triton(a, c, EPS), y, None, w, gout)
    ref, ref_grads = _grads(lambda a, b, c: norm_layer.rms_norm(a, c, EPS), y.double(), None, w.double(), gout)
    errors = {"out": rel_err(out, ref), **{f"d{k}": rel_err(grads[k], ref_grads[k]) for k in ref_grads}}
    assert all(v <= 1e-5 for v in errors.values()), errors


def test_gradients_bit_identical():
    """Several programs, each walking several row blocks: two runs give the same bits."""
    y, z, w, gout = _inputs((300, 64), True, torch.float16, seed=5)
    fn = lambda a, b, c: tnorm.rms_norm_gated_triton(a, b, c, EPS, 32, False)  # noqa: E731
    out1, g1 = _grads(fn, y, z, w, gout)
    out2, g2 = _grads(fn, y, z, w, gout)
    assert torch.equal(out1, out2)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


def test_layer_dispatch(monkeypatch):
    """The layers route to Triton when _use_triton says so (CUDA in real use); same result as their PyTorch path."""
    y, z, w, _ = _inputs((5, 96), True, torch.float32, seed=6)
    gated = norm_layer.RMSNormGated(96, eps=EPS, group_size=32, norm_before_gate=True)
    plain = norm_layer.RMSNorm(96, eps=EPS)
    with torch.no_grad():
        gated.weight.copy_(w)
        plain.weight.copy_(w)
    assert not norm_layer._use_triton(y, w, z)  # CPU: the PyTorch path
    ref_gated, ref_plain = gated(y, z), plain(y)
    calls = []
    real = tnorm.rms_norm_gated_triton

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(tnorm, "rms_norm_gated_triton", spy)
    monkeypatch.setattr(norm_layer, "_use_triton", lambda *args: True)
    out_gated, out_plain = gated(y, z), plain(y)
    assert len(calls) == 1 and calls[0][3:] == (EPS, 32, True)
    assert rel_err(out_gated, ref_gated) <= 1e-6 and rel_err(out_plain, ref_plain) <= 1e-6


def test_empty_rows():
    y = torch.randn(0, 3, 48, requires_grad=True)
    out = tnorm.rms_norm_gated_triton(y, torch.randn(0, 3, 48), torch.ones(48), EPS)
    assert out.shape == y.shape and out.dtype == y.dtype


def test_errors():
    y = torch.randn(3, 96)
    with pytest.raises(MambaKitError, match="group_size"):
        tnorm.rms_norm_gated_triton(y, None, torch.ones(96), EPS, 40)
    with pytest.raises(MambaKitError, match=r"weight must have shape \(d=96,\)"):
        tnorm.rms_norm_gated_triton(y, None, torch.ones(48), EPS)
    with pytest.raises(MambaKitError, match="z must have"):
        tnorm.rms_norm_gated_triton(y, torch.randn(3, 48), torch.ones(96), EPS)
    with pytest.raises(MambaKitError, match="float64"):
        tnorm.rms_norm_triton(y.double(), torch.ones(96), EPS)
    with pytest.raises(MambaKitError, match="0-d"):
        tnorm.rms_norm_triton(torch.tensor(1.0), torch.ones(1), EPS)
