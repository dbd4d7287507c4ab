"""Mamba-3 SISO through the SSD Triton kernels (mambakit.ops.mamba3.ssd_form, ssd_backend="triton") on the CPU
interpreter: float32 forward, final states and every gradient against the float64 step recurrence; float16 inputs."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are (re)loaded: kernels run on the CPU interpreter

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from mambakit.ops.mamba3 import mamba3_scan_ref  # noqa: E402
from mambakit.ops.mamba3.ssd_form import mamba3_ssd  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.ops.mamba3.helpers import as_dtype, assert_same_outputs, scan_grads, scan_inputs  # noqa: E402
from tests.ops.triton import interpreted_module  # noqa: E402

interpreted_module("mambakit.ops.ssd.triton")

SHAPES = [
    dict(),
    dict(batch=1, seqlen=70, nheads=2, ngroups=1, headdim=4, d_state=8, n_angles=4),
    dict(batch=2, seqlen=1, nheads=2, ngroups=2, headdim=2, d_state=5, n_angles=2),
    dict(batch=2, seqlen=19, nheads=3, ngroups=3, headdim=3, d_state=6, n_angles=1, gate=False, states=False),
]


def _triton(**kw):
    return mamba3_ssd(**kw, chunk_size=64, return_final_states=True, ssd_backend="triton")


def _ref(**kw):
    return mamba3_scan_ref(**kw, return_final_states=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_forward_and_gradients_match_recurrence(shape):
    kw = scan_inputs(**shape)
    ref_out, ref = scan_grads(kw, _ref)
    out, got = scan_grads(as_dtype(kw, torch.float32), _triton)
    assert out[0].dtype == torch.float32
    assert_same_outputs(out, ref_out, 1e-5)
    for name in ref:
        assert rel_err(got[name], ref[name]) < 1e-5, name


def test_float16_inputs():
    kw = scan_inputs(seqlen=40)
    ref = _ref(**kw)
    out = _triton(**as_dtype(kw, torch.float16))
    assert out[0].dtype == torch.float16
    assert rel_err(out[0], ref[0]) < 1e-2 and rel_err(out[2], ref[2]) < 1e-2


def test_scan_backend_ssd_dispatches_to_the_ssd_form(monkeypatch):
    import mambakit.ops.mamba3.ssd_form as ssd_form
    from mambakit.ops.mamba3 import mamba3_scan

    calls = []
    real = ssd_form.mamba3_ssd
    monkeypatch.setattr(ssd_form, "mamba3_ssd", lambda *a, **k: calls.append(k["ssd_backend"]) or real(*a, **k))
    kw = as_dtype(scan_inputs(seqlen=30), torch.float32)
    y = mamba3_scan(**kw, backend="ssd")
    assert calls == ["triton"]
    assert rel_err(y, mamba3_scan_ref(**scan_inputs(seqlen=30))) < 1e-5
    mamba3_scan(**kw)  # "auto" on the CPU: the chunked PyTorch form
    assert calls == ["triton"]


def test_mimo_scan_rejects_the_ssd_backend():
    from mambakit.errors import MambaKitError
    from mambakit.ops.mamba3.mimo import mamba3_mimo_scan
    from tests.ops.mamba3.helpers import mimo_inputs

    with pytest.raises(MambaKitError, match="SISO only"):
        mamba3_mimo_scan(**mimo_inputs(), backend="ssd")


@pytest.mark.parametrize("is_mimo", [False, True])
def test_layer_with_ssd_backend_on_cpu_is_the_torch_form(is_mimo):
    from mambakit.layers.mamba3 import Mamba3

    torch.manual_seed(0)
    layer = Mamba3(32, d_state=16, headdim=8, is_mimo=is_mimo, mimo_rank=2, chunk_size=8)
    x = torch.randn(2, 21, 32)
    want = layer(x)
    layer.scan_backend = "ssd"
    assert torch.equal(layer(x), want)
