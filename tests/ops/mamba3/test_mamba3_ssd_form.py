"""Mamba-3 SISO through the SSD op with a per-position log-decay (mambakit.ops.mamba3.ssd_form) against the step
recurrence: float64 forward, final states and every gradient, on awkward shapes, initial states, packed sequences,
continuation; the SSD's PyTorch forms here (its Triton kernels: test_mamba3_ssd_form_triton)."""
from __future__ import annotations

import pytest
import torch

from mambakit.ops.mamba3 import mamba3_scan_ref
from mambakit.ops.mamba3.ssd_form import CUMSUM_BLOCK, mamba3_ssd, position_cumsum
from tests.conftest import rel_err
from tests.ops.mamba3.helpers import assert_same_outputs, scan_grads, scan_inputs
from tests.ops.mamba3.test_mamba3_scan import SHAPES


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ssd_backend,chunk_size", [("torch", 4), ("torch", 64), ("ref", 7)])
def test_equals_recurrence_float64(shape, ssd_backend, chunk_size):
    kw = scan_inputs(**shape)
    out = mamba3_ssd(**kw, chunk_size=chunk_size, return_final_states=True, ssd_backend=ssd_backend)
    assert_same_outputs(out, mamba3_scan_ref(**kw, return_final_states=True), 1e-12)
    assert out[0].dtype == torch.float64


@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[4:])
def test_gradients_equal_recurrence_float64(shape):
    kw = scan_inputs(**shape)
    ref_out, ref = scan_grads(kw, lambda **a: mamba3_scan_ref(**a, return_final_states=True))
    out, got = scan_grads(kw, lambda **a: mamba3_ssd(**a, chunk_size=5, return_final_states=True,
                                                     ssd_backend="torch"))
    assert_same_outputs(out, ref_out, 1e-12)
    assert set(got) == set(ref)
    for name in ref:
        assert torch.isfinite(got[name]).all(), name
        assert rel_err(got[name], ref[name]) < 1e-10, name


def test_without_optional_inputs_and_y_only():
    kw = scan_inputs(states=False, packed=False, gate=False)
    del kw["D"]
    y = mamba3_ssd(**kw, ssd_backend="torch")
    assert isinstance(y, torch.Tensor)
    assert rel_err(y, mamba3_scan_ref(**kw)) < 1e-12


def test_continuation_equals_one_pass():
    kw = scan_inputs(states=False, packed=False, seqlen=40)
    first = {n: (t[:, :17] if n in ("Q", "K", "V", "Angles", "Z") else t[..., :17] if n in ("ADT", "DT", "Trap")
                 else t) for n, t in kw.items()}
    rest = {n: (t[:, 17:] if n in ("Q", "K", "V", "Angles", "Z") else t[..., 17:] if n in ("ADT", "DT", "Trap")
                else t) for n, t in kw.items()}
    y1, *states = mamba3_ssd(**first, chunk_size=8, return_final_states=True, ssd_backend="torch")
    y2 = mamba3_ssd(**rest, Input_States=tuple(states), chunk_size=8, ssd_backend="torch")
    assert rel_err(torch.cat((y1, y2), 1), mamba3_scan_ref(**kw)) < 1e-12


def test_float32_agrees_with_float64():
    kw = scan_inputs(seqlen=70)
    ref = mamba3_scan_ref(**kw, return_final_states=True)
    kw32 = {n: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}
    kw32["Input_States"] = tuple(s.float() for s in kw["Input_States"])
    out = mamba3_ssd(**kw32, chunk_size=16, return_final_states=True, ssd_backend="torch")
    assert out[0].dtype == torch.float32
    assert_same_outputs(out, ref, 2e-5)


def test_unknown_ssd_backend_raises():
    from mambakit.errors import MambaKitError

    with pytest.raises(MambaKitError, match="ssd_backend must be one of"):
        mamba3_ssd(**scan_inputs(), ssd_backend="cuda")


@pytest.mark.parametrize("seqlen", [1, CUMSUM_BLOCK - 1, CUMSUM_BLOCK, CUMSUM_BLOCK + 1, 3 * CUMSUM_BLOCK + 17])
def test_position_cumsum_equals_cumsum(seqlen):
    g = torch.Generator().manual_seed(seqlen)
    x = torch.randn(2, seqlen, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, seqlen, 3, 5, generator=g, dtype=torch.float64)
    got = position_cumsum(x)
    ref = x.cumsum(1)
    assert got.shape == ref.shape and rel_err(got, ref) < 1e-14
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    assert rel_err(g_got, g_ref) < 1e-14
    x_bad = x.detach().clone()
    x_bad[1, seqlen // 2, 0, 0] = float("nan")  # a non-finite increment reaches only later positions
    out = position_cumsum(x_bad)
    assert torch.isfinite(out[1, : seqlen // 2]).all() and torch.isnan(out[1, seqlen // 2:, 0, 0]).all()
    assert torch.isfinite(out[0]).all()
