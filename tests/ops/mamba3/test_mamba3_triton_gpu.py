"""GPU: the Mamba-3 SISO Triton scan, forward and every gradient, in float32 and bfloat16 against the chunked
PyTorch form in float32 (fed the same rounded inputs), at shapes near the 130M model's (headdim 64, d_state 128)
and odd ones, with packed sequences and initial states; gradients bit-identical run to run."""
from __future__ import annotations

import pytest
import torch

from mambakit.ops.mamba3 import mamba3_scan
from tests.conftest import rel_err
from tests.ops.mamba3.helpers import as_dtype, scan_grads, scan_inputs

pytestmark = pytest.mark.gpu

SHAPES = [
    dict(batch=2, seqlen=300, nheads=8, ngroups=1, headdim=64, d_state=128, n_angles=32),
    dict(batch=1, seqlen=197, nheads=3, ngroups=3, headdim=40, d_state=48, n_angles=24, states=False),
    dict(batch=3, seqlen=64, nheads=2, ngroups=1, headdim=128, d_state=64, n_angles=16, gate=False),
]


def _scan(backend):
    def scan(**kw):
        return mamba3_scan(**kw, return_final_states=True, chunk_size=64, backend=backend)
    return scan


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_triton_scan_gradients_cuda(shape, dtype, tol):
    kw = as_dtype(scan_inputs(**shape, dtype=torch.float64), dtype, "cuda")
    ref_out, ref = scan_grads(as_dtype(kw, torch.float32, "cuda"), _scan("torch"))
    out, got = scan_grads(kw, _scan("triton"))
    assert out[0].dtype == dtype
    assert rel_err(out[0], ref_out[0]) < tol
    assert rel_err(out[2], ref_out[2]) < tol
    for name in ref:
        assert rel_err(got[name], ref[name]) < tol, name
    _, again = scan_grads(kw, _scan("triton"))
    for name in got:
        assert torch.equal(got[name], again[name]), name


def test_auto_backend_agrees_with_triton_on_cuda():
    kw = as_dtype(scan_inputs(seqlen=70, dtype=torch.float64), torch.float32, "cuda")
    assert rel_err(mamba3_scan(**kw), mamba3_scan(**kw, backend="triton")) < 1e-5
