"""The fused residual add + RMSNorm (forward and backward, for training) against the PyTorch composition in float64,
on the CPU interpreter: every gradient, no residual, residual_in_fp32 off, the output dtype, NaN rows."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch

from tests.conftest import rel_err
from tests.ops.triton import interpreted_module

norm_ops = interpreted_module("mambakit.ops.norm")
interpreted_module("mambakit.ops.norm.add_triton")


def _inputs(rows, d, with_res, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, 3, d, generator=g).requires_grad_()
    r = (torch.randn(rows, 3, d, generator=g) * 2).requires_grad_() if with_res else None
    w = (1 + 0.3 * torch.randn(d, generator=g)).requires_grad_()
    return h, r, w


def _run(backend, h, r, w, fp32=True, out_dtype=None, dtype=torch.float32):
    hh, ww = h.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    rr = r.detach().to(dtype).requires_grad_() if r is not None else None
    normed, res = norm_ops.add_rms_norm(hh, rr, ww, 1e-5, fp32, backend=backend, out_dtype=out_dtype)
    g = torch.Generator().manual_seed(3)
    loss = (normed.double() * torch.randn(normed.shape, generator=g, dtype=torch.float64)).sum() \
        + (res.double() * torch.randn(res.shape, generator=g, dtype=torch.float64)).sum()
    leaves = [hh, ww] + ([rr] if rr is not None else [])
    return normed, res, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("rows,d,with_res", [(5, 24, True), (2, 7, False), (9, 40, True)])
def test_fused_add_norm_matches_float64_composition(rows, d, with_res):
    h, r, w = _inputs(rows, d, with_res)
    n, res, grads = _run("triton", h, r, w)
    n64, res64, grads64 = _run("torch", h, r, w, dtype=torch.float64)
    assert n.dtype == torch.float32 and res.dtype == torch.float32
    assert rel_err(n, n64) < 1e-5 and rel_err(res, res64) < 1e-6
    for a, b in zip(grads, grads64):
        assert rel_err(a, b) < 1e-5


def test_out_dtype_and_residual_dtype():
    h, r, w = _inputs(4, 16, True)
    n, res, _ = _run("triton", h, r, w, out_dtype=torch.bfloat16)
    n_ref, res_ref, _ = _run("torch", h, r, w, out_dtype=torch.bfloat16)
    assert n.dtype == n_ref.dtype == torch.bfloat16 and rel_err(n, n_ref) < 1e-2
    assert torch.equal(res, res_ref)
    # bfloat16 activations without residual_in_fp32 keep the residual in bfloat16
    hb = h.detach().bfloat16().requires_grad_()
    rb = r.detach().bfloat16().requires_grad_()
    normed, res = norm_ops.add_rms_norm(hb, rb, w.detach(), 1e-5, False, backend="triton")
    assert res.dtype == torch.bfloat16 and normed.dtype == torch.float32
    (normed.sum() + res.float().sum()).backward()
    assert hb.grad.dtype == torch.bfloat16 and rb.grad.dtype == torch.bfloat16


def test_a_non_finite_row_stays_in_its_row():
    h, r, w = _inputs(3, 16, True)
    h = h.detach().clone()
    h[1, 2, 5] = float("nan")
    n, res = norm_ops.add_rms_norm(h, r.detach(), w.detach(), 1e-5, True, backend="triton")
    bad = ~torch.isfinite(n)
    assert bad[1, 2].all() and bad.sum() == 16
