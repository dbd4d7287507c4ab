"""Mamba-3 MIMO (rank R) in PyTorch: chunked == step recurrence in float64 (forward, final states and every
gradient; awkward shapes, initial states, packed sequences), rank 1 == SISO, continuation from a state, the
one-token step, the gate/output mix, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.errors import MambaKitError
from mambakit.ops.mamba3 import mamba3_scan
from mambakit.ops.mamba3.mimo import mamba3_mimo_chunked, mamba3_mimo_scan_ref, mamba3_mimo_step, mimo_combine
from tests.conftest import rel_err
from tests.ops.mamba3.helpers import angle_err, assert_same_outputs, mimo_inputs, scan_grads

SHAPES = [
    dict(),
    dict(rank=4, batch=1, seqlen=40, nheads=2, ngroups=1, headdim=3, d_state=8, n_angles=4, packed=False),
    dict(rank=2, batch=2, seqlen=1, nheads=2, ngroups=2, headdim=2, d_state=4, n_angles=1),
    dict(rank=1, batch=3, seqlen=17, nheads=3, ngroups=3, headdim=4, d_state=5, n_angles=2, states=False),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_size", [4, 7, 64])
def test_chunked_equals_recurrence_float64(shape, chunk_size):
    kw = mimo_inputs(**shape)
    assert_same_outputs(mamba3_mimo_chunked(**kw, chunk_size=chunk_size, return_final_states=True),
          mamba3_mimo_scan_ref(**kw, return_final_states=True), 1e-12)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_gradients_equal_recurrence_float64(shape):
    kw = mimo_inputs(**shape)
    _, ref = scan_grads(kw, lambda **a: mamba3_mimo_scan_ref(**a, return_final_states=True))
    _, got = scan_grads(kw, lambda **a: mamba3_mimo_chunked(**a, chunk_size=5, return_final_states=True))
    assert set(got) == set(ref)
    for name in ref:
        assert rel_err(got[name], ref[name]) < 1e-10, name


def test_rank_one_is_siso():
    kw = mimo_inputs(rank=1)
    siso = dict(kw, Q=kw["Q"][:, :, 0], K=kw["K"][:, :, 0], Q_bias=kw["Q_bias"][:, 0], K_bias=kw["K_bias"][:, 0],
                V=kw["V"] * kw["MIMO_V"][:, 0], Input_States=None)
    del siso["MIMO_V"]
    kw["Input_States"] = None
    out = mamba3_mimo_chunked(**kw, chunk_size=8, return_final_states=True)
    ref = mamba3_scan(**siso, return_final_states=True, backend="ref")
    assert rel_err(out[0][:, :, 0], ref[0]) < 1e-12 and rel_err(out[2], ref[2]) < 1e-12
    assert rel_err(out[3][:, 0], ref[3]) < 1e-12


def test_continuation_and_step():
    kw = mimo_inputs(packed=False)
    full = mamba3_mimo_chunked(**kw, chunk_size=4, return_final_states=True)
    cut = 15
    part = {n: (t[:, :cut] if n in ("Q", "K", "V", "Angles") else t[..., :cut] if n in ("ADT", "DT", "Trap") else t)
            for n, t in kw.items()}
    first = mamba3_mimo_chunked(**part, chunk_size=4, return_final_states=True)
    states = tuple(s.clone() for s in first[1:])
    ys = []
    for t in range(cut, kw["V"].shape[1]):
        ys.append(mamba3_mimo_step(states, kw["Q"][:, t], kw["K"][:, t], kw["V"][:, t], kw["MIMO_V"],
                                   kw["ADT"][..., t], kw["DT"][..., t], kw["Trap"][..., t], kw["Q_bias"],
                                   kw["K_bias"], kw["Angles"][:, t], D=kw["D"]))
    assert rel_err(torch.cat((first[0], torch.stack(ys, 1)), 1), full[0]) < 1e-12
    assert angle_err(states[0], full[1]) < 1e-12
    for a, b in zip(states[1:], full[2:]):
        assert rel_err(a, b) < 1e-12


def test_combine():
    g = torch.Generator().manual_seed(0)
    y, z = torch.randn(2, 3, 4, 5, 6, generator=g), torch.randn(2, 3, 5, 6, generator=g)
    mo, mz = torch.randn(5, 4, 6, generator=g), torch.randn(5, 4, 6, generator=g)
    want = sum(mo[:, r] * y[:, :, r] * F.silu(z * mz[:, r]) for r in range(4))
    assert rel_err(mimo_combine(y, mo, z, mz), want) < 1e-6
    assert rel_err(mimo_combine(y, mo), sum(mo[:, r] * y[:, :, r] for r in range(4))) < 1e-6


def test_errors():
    kw = mimo_inputs()
    with pytest.raises(MambaKitError, match="MIMO_V"):
        mamba3_mimo_chunked(**dict(kw, MIMO_V=kw["MIMO_V"][:, :2]))
    with pytest.raises(MambaKitError, match="Q must have shape"):
        mamba3_mimo_scan_ref(**dict(kw, Q=kw["Q"][:, :, 0]))
    with pytest.raises(MambaKitError, match="Input_States.k"):
        mamba3_mimo_chunked(**dict(kw, Input_States=kw["Input_States"][:2] + (kw["Input_States"][2][:, :1],
                                                                           kw["Input_States"][3])))


def test_non_finite_v_stays_causal():
    kw = mimo_inputs(packed=False, states=False)
    kw["V"] = kw["V"].clone()
    kw["V"][0, 10, 1, 2] = float("nan")
    y = mamba3_mimo_chunked(**kw, chunk_size=8)
    assert torch.isfinite(y[:, :10]).all() and torch.isfinite(y[1]).all() and torch.isnan(y[0, 10:, :, 1, 2]).all()
