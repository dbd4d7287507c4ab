"""GPU: the Mamba-3 Triton scans (SISO, and MIMO of rank 2-4), forward and every gradient, in float32 and bfloat16
(MIMO also float16), and SISO through the SSD kernels (backend "ssd"), against the chunked PyTorch form in float32
(fed the same rounded inputs), at shapes near the 130M model's (headdim 64, d_state 128) and odd ones, with packed
sequences and initial states; gradients bit-identical run to run; the layer's scan_backend="triton" reaching the
kernels."""
from __future__ import annotations

import pytest
import torch

from mambakit.ops.mamba3 import mamba3_scan
from mambakit.ops.mamba3.mimo import mamba3_mimo_scan
from tests.conftest import rel_err
from tests.ops.mamba3.helpers import as_dtype, assert_matches_torch, mimo_inputs, scan_grads, scan_inputs

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
@pytest.mark.parametrize("backend", ["triton", "ssd"])  # the Mamba-3 kernels; the SSD kernels (ops/mamba3/ssd_form)
def test_triton_scan_gradients_cuda(shape, dtype, tol, backend):
    kw = as_dtype(scan_inputs(**shape, dtype=torch.float64), dtype, "cuda")
    assert_matches_torch(kw, dtype, tol, _scan("torch"), _scan(backend))


def test_auto_backend_agrees_with_triton_on_cuda():
    kw = as_dtype(scan_inputs(seqlen=70, dtype=torch.float64), torch.float32, "cuda")
    assert rel_err(mamba3_scan(**kw), mamba3_scan(**kw, backend="triton")) < 1e-5
    assert torch.equal(mamba3_scan(**kw), mamba3_scan(**kw, backend="ssd"))  # "auto" on float32 CUDA: the SSD form
    kw16 = as_dtype(kw, torch.bfloat16, "cuda")
    assert torch.equal(mamba3_scan(**kw16), mamba3_scan(**kw16, backend="ssd"))  # 16-bit too (tf32 products)


MIMO_SHAPES = [
    dict(rank=4, batch=2, seqlen=300, nheads=8, ngroups=1, headdim=64, d_state=128, n_angles=32),
    dict(rank=2, batch=1, seqlen=197, nheads=3, ngroups=3, headdim=40, d_state=48, n_angles=24, states=False),
    dict(rank=3, batch=3, seqlen=64, nheads=2, ngroups=1, headdim=128, d_state=64, n_angles=16, packed=False),
]


def _mimo(backend):
    def scan(**kw):
        return mamba3_mimo_scan(**kw, return_final_states=True, chunk_size=16, backend=backend)
    return scan


@pytest.mark.parametrize("shape", MIMO_SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_triton_mimo_scan_gradients_cuda(shape, dtype, tol):
    kw = as_dtype(mimo_inputs(**shape, dtype=torch.float64), dtype, "cuda")
    assert_matches_torch(kw, dtype, tol, _mimo("torch"), _mimo("triton"), _own_rounding_tol(kw, dtype, tol))


def _own_rounding_tol(kw, dtype, tol):
    """bfloat16 in and out costs the chunked PyTorch form itself up to 1.8e-2 in the angles' and DT's gradients at
    rank 4, d_state 128 (against float32 on the same rounded inputs; the H200, benchmarks/RESULTS.md): the kernels are
    held to 1e-2 or to 1.25x of that form's own error in the same dtype, whichever is larger."""
    if dtype != torch.bfloat16:
        return None
    ref = scan_grads(as_dtype(kw, torch.float32, "cuda"), _mimo("torch"))[1]
    same_dtype = scan_grads(kw, _mimo("torch"))[1]
    return {name: max(tol, 1.25 * rel_err(same_dtype[name], ref[name])) for name in ref}


@pytest.mark.parametrize("is_mimo", [False, True])
def test_layer_routes_to_triton_on_cuda(is_mimo, monkeypatch):
    import mambakit.ops.mamba3.triton as siso_kernels
    import mambakit.ops.mamba3.triton_mimo as mimo_kernels
    from mambakit.layers.mamba3 import Mamba3

    calls = []
    module, name = (mimo_kernels, "mamba3_mimo_scan_triton") if is_mimo else (siso_kernels, "mamba3_scan_triton")
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    layer = Mamba3(64, d_state=32, headdim=16, is_mimo=is_mimo, mimo_rank=4, chunk_size=16).cuda()
    x = torch.randn(2, 50, 64, device="cuda")
    want = layer(x)
    layer.scan_backend = "triton"
    got = layer(x)
    assert calls and rel_err(got, want) < 1e-4
