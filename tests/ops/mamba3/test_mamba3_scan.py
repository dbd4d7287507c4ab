"""Mamba-3 SISO scan: chunked == step recurrence (float64 forward and every gradient, awkward shapes, initial states,
packed sequences), continuation, the Mamba-2 special case, causality with non-finite inputs, the one-token step,
argument errors."""
from __future__ import annotations

import math

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.ops.mamba3 import mamba3_scan, mamba3_step
from mambakit.ops.ssd import ssd_recurrent
from tests.conftest import rel_err
from tests.ops.mamba3.helpers import angle_err, scan_inputs

SHAPES = [
    dict(),
    dict(batch=1, seqlen=64, nheads=3, ngroups=1, headdim=4, d_state=8, n_angles=4, packed=False),
    dict(batch=3, seqlen=19, nheads=6, ngroups=3, headdim=3, d_state=6, n_angles=1, gate=False),
    dict(batch=2, seqlen=1, nheads=2, ngroups=2, headdim=2, d_state=5, n_angles=2),
    dict(batch=2, seqlen=50, nheads=2, ngroups=1, headdim=6, d_state=12, n_angles=3, states=False),
]


def _outputs(kw, **extra):
    return mamba3_scan(**kw, return_final_states=True, **extra)


def _assert_same(out, ref, tol):
    y, angle, ssm, k, v = out
    y_r, angle_r, ssm_r, k_r, v_r = ref
    assert rel_err(y, y_r) < tol
    assert angle_err(angle, angle_r) < tol
    for a, b in ((ssm, ssm_r), (k, k_r), (v, v_r)):
        assert rel_err(a, b) < tol


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_size", [4, 7, 64])
def test_chunked_equals_recurrence_float64(shape, chunk_size):
    kw = scan_inputs(**shape)
    _assert_same(_outputs(kw, chunk_size=chunk_size), _outputs(kw, backend="ref"), 1e-12)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_gradients_equal_recurrence_float64(shape):
    kw = scan_inputs(**shape)
    leaves = {name: (t.clone().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
              for name, t in kw.items()}
    if "Input_States" in kw:
        leaves["Input_States"] = tuple(s.clone().requires_grad_(True) for s in kw["Input_States"])
    inputs = [t for name, t in leaves.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    inputs += list(leaves.get("Input_States", ()))
    g = torch.Generator().manual_seed(5)
    grads = []
    for backend in ("torch", "ref"):
        y, angle, ssm, k, v = mamba3_scan(**leaves, chunk_size=5, return_final_states=True, backend=backend)
        w = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (y, ssm, k, v)]
        loss = sum((a * b).sum() for a, b in zip((y, ssm, k, v), w)) + torch.cos(angle).sum()
        grads.append(torch.autograd.grad(loss, inputs))
        g.manual_seed(5)
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-10


def test_float32_agrees_with_float64():
    kw64 = scan_inputs(batch=2, seqlen=70, nheads=4, ngroups=1, headdim=8, d_state=16, n_angles=8)
    kw32 = {n: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw64.items()}
    kw32["Input_States"] = tuple(s.float() for s in kw64["Input_States"])
    out32 = _outputs(kw32, chunk_size=16)
    assert out32[0].dtype == torch.float32 and out32[2].dtype == torch.float32
    _assert_same(out32, _outputs(kw64, backend="ref"), 1e-5)


def test_continuation_from_final_states_equals_one_pass():
    kw = scan_inputs(seqlen=41, packed=False)
    full = _outputs(kw, chunk_size=8)
    cut = 17
    first = {n: t for n, t in kw.items()}
    second = {n: t for n, t in kw.items()}
    for name in ("Q", "K", "V", "Angles", "Z"):
        first[name], second[name] = kw[name][:, :cut], kw[name][:, cut:]
    for name in ("ADT", "DT", "Trap"):
        first[name], second[name] = kw[name][..., :cut], kw[name][..., cut:]
    y1, *states = _outputs(first, chunk_size=8)
    second["Input_States"] = tuple(states)
    y2, *final = _outputs(second, chunk_size=6)
    _assert_same((torch.cat((y1, y2), 1), *final), full, 1e-12)


def test_packed_sequences_equal_separate_runs():
    kw = scan_inputs(batch=1, seqlen=30, states=False, packed=False)
    seq_idx = torch.zeros(1, 30, dtype=torch.long)
    seq_idx[:, 12:] = 1
    packed = _outputs(dict(kw, seq_idx=seq_idx), chunk_size=8)
    pieces = []
    for lo, hi in ((0, 12), (12, 30)):
        part = {n: t for n, t in kw.items()}
        for name in ("Q", "K", "V", "Angles", "Z"):
            part[name] = kw[name][:, lo:hi]
        for name in ("ADT", "DT", "Trap"):
            part[name] = kw[name][..., lo:hi]
        pieces.append(_outputs(part, chunk_size=5))
    _assert_same((torch.cat((pieces[0][0], pieces[1][0]), 1), *pieces[1][1:]), packed, 1e-12)


def test_lambda_one_without_rotation_is_mamba2():
    """Trap -> +inf (Euler's rule), Angles = 0, no biases: the SSD recurrence of Mamba-2 with A = ADT / DT."""
    kw = scan_inputs(batch=2, seqlen=23, nheads=4, ngroups=2, states=False, packed=False)
    A = -torch.rand(4, dtype=torch.float64) - 0.1
    kw.update(Trap=torch.full_like(kw["Trap"], 1e4), Angles=torch.zeros_like(kw["Angles"]),
              Q_bias=torch.zeros_like(kw["Q_bias"]), K_bias=torch.zeros_like(kw["K_bias"]),
              ADT=A[:, None] * kw["DT"])
    y, _, ssm, _, _ = _outputs(kw, chunk_size=6)
    y2, ssm2 = ssd_recurrent(kw["V"], kw["DT"].transpose(1, 2), A, kw["K"], kw["Q"], D=kw["D"], z=kw["Z"],
                             return_final_states=True)
    assert rel_err(y, y2) < 1e-12 and rel_err(ssm, ssm2) < 1e-12


@pytest.mark.parametrize("name", ["Q", "K", "V", "ADT", "DT", "Trap", "Angles", "Z"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_stays_causal(name, bad):
    kw = scan_inputs(batch=1, seqlen=29, packed=False, states=False)
    clean = mamba3_scan(**kw, chunk_size=8)
    t = 13  # inside the second chunk
    poisoned = kw[name].clone()
    if name in ("ADT", "DT", "Trap"):
        poisoned[..., t] = bad
    else:
        poisoned[:, t] = bad
    y = mamba3_scan(**dict(kw, **{name: poisoned}), chunk_size=8)
    assert torch.equal(y[:, :t], clean[:, :t]) or rel_err(y[:, :t], clean[:, :t]) < 1e-14
    if name in ("V", "Q", "K", "Z"):
        assert not torch.isfinite(y[:, t]).all()


def test_step_loop_equals_scan():
    kw = scan_inputs(batch=3, seqlen=12, nheads=4, ngroups=2, packed=False)
    y_ref, *final_ref = _outputs(kw, backend="ref")
    states = tuple(s.clone() for s in kw["Input_States"])
    ys = [mamba3_step(states, kw["Q"][:, t], kw["K"][:, t], kw["V"][:, t], kw["ADT"][..., t], kw["DT"][..., t],
                      kw["Trap"][..., t], kw["Q_bias"], kw["K_bias"], kw["Angles"][:, t], D=kw["D"], Z=kw["Z"][:, t])
          for t in range(12)]
    _assert_same((torch.stack(ys, 1), *states), (y_ref, *final_ref), 1e-13)


@pytest.mark.parametrize("change,msg", [
    (dict(V=torch.zeros(2, 37, 4)), "V must have shape"),
    (dict(Q=torch.zeros(2, 37, 3, 7)), "divisible by ngroups"),
    (dict(Angles=torch.zeros(2, 37, 4, 4, dtype=torch.float64)), "2 \\* n_angles <= d_state=7"),
    (dict(DT=torch.zeros(2, 37, 4, dtype=torch.float64)), "DT must have shape \\(batch=2, nheads=4, seqlen=37\\)"),
    (dict(D=torch.zeros(3, dtype=torch.float64)), "D must have shape"),
    (dict(seq_idx=torch.zeros(2, 37)), "seq_idx must be an integer tensor"),
    (dict(Input_States=(1, 2, 3)), "Input_States must be a tuple"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_argument_errors(change, msg):
    kw = scan_inputs()
    with pytest.raises(MambaKitError, match=msg):
        mamba3_scan(**dict(kw, **change))
