"""GPU: the compiled GEMV kernels (`mambakit.ops.triton.gemv`) in bfloat16 against the unfused pair (the norm, then
F.linear) and against float64 under the rounding contract (f's output rounded to bf16, an exact product), at the
decode shapes and batches 1, 2, 16 and 17 (launch_config's own choices: the 1-row path, the tensor-core path, the
k split of the narrow out_proj), twice bit-identical; float32 weights against float64 (no TF32).

Run it in its own pytest call (`pytest -m gpu tests/ops/test_gemv_gpu.py`): tests/ops/triton sets TRITON_INTERPRET
for its session, and the kernels would then run on the interpreter (such a session skips these)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.ops.norm import add_rms_norm, rms_norm_gated
from mambakit.ops.triton.device import interpreted
from tests.conftest import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(interpreted(), reason="TRITON_INTERPRET is set")]

BATCHES = [1, 2, 16, 17]


def _gemv():
    from mambakit.ops.triton import gemv
    return gemv


def _rand(g, *shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("k,n", [(768, 3072), (2048, 8192)])
def test_add_norm_bf16(batch, k, n):
    g = torch.Generator("cuda").manual_seed(batch + k)
    hidden, residual = _rand(g, batch, 1, k), _rand(g, batch, 1, k, dtype=torch.float32)
    nw, w = (torch.rand(k, generator=g, device="cuda") + 0.5).bfloat16(), _rand(g, n, k, scale=k ** -0.5)
    outs = [_gemv().add_rms_norm_gemv_triton(hidden, residual, nw, 1e-5, True, w) for _ in range(2)]
    normed, ref_res = add_rms_norm(hidden, residual, nw, 1e-5, True)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], ref_res)
    assert rel_err(outs[0][0], F.linear(normed, w)) < 1e-2
    assert rel_err(outs[0][0], normed.double() @ w.double().T) < 5e-3


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("ngroups,norm_before_gate", [(1, False), (8, True)])
@pytest.mark.parametrize("k,n", [(1536, 768), (4096, 2048)])
def test_gated_bf16(batch, ngroups, norm_before_gate, k, n):
    g = torch.Generator("cuda").manual_seed(batch + ngroups + k)
    y, z = _rand(g, batch, k), _rand(g, batch, 2 * k)[:, :k]
    nw, w, b = (torch.rand(k, generator=g, device="cuda") + 0.5).bfloat16(), _rand(g, n, k, scale=k ** -0.5), \
        _rand(g, n)
    outs = [_gemv().rms_norm_gated_gemv_triton(y, z, nw, 1e-5, k // ngroups, norm_before_gate, w, b)
            for _ in range(2)]
    normed = rms_norm_gated(y, z, nw, 1e-5, k // ngroups, norm_before_gate)
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[0], F.linear(normed, w, b)) < 1e-2
    assert rel_err(outs[0], normed.double() @ w.double().T + b.double()) < 5e-3


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-3), (torch.float32, 1e-5)])
def test_plain(batch, dtype, tol):
    g = torch.Generator("cuda").manual_seed(batch)
    x, w = _rand(g, batch, 1536, dtype=dtype), _rand(g, 768, 1536, dtype=dtype, scale=0.03)
    out = _gemv().gemv_triton(x, w)
    assert out.dtype == dtype and rel_err(out, x.double() @ w.double().T) < tol


def test_nan_stays_in_its_row():
    x = torch.ones(3, 768, device="cuda", dtype=torch.bfloat16)
    x[1, 5] = float("nan")
    w = torch.ones(3072, 768, device="cuda", dtype=torch.bfloat16) * 0.01
    out, _ = _gemv().add_rms_norm_gemv_triton(x, None, torch.ones_like(x[0]), 1e-5, True, w)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
