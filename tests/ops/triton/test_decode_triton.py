"""The fused decode-step kernels (add + RMSNorm, conv-state update) against the PyTorch path, on the CPU interpreter."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch

from mambakit.errors import MambaKitError
from mambakit.layers.norm import rms_norm
from mambakit.ops.conv1d import causal_conv1d_update
from tests.conftest import rel_err
from tests.ops.triton import interpreted_module

decode = interpreted_module("mambakit.ops.triton.decode")
add_norm = interpreted_module("mambakit.ops.norm.add_triton")


def _torch_add_norm(hidden, residual, weight, eps, residual_in_fp32):
    residual = hidden if residual is None else residual + hidden
    normed = rms_norm(residual.to(weight.dtype), weight, eps)
    return normed, residual.float() if residual_in_fp32 else residual


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [1, 7, 64, 100])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("res_fp32", [True, False])
def test_add_rms_norm_decode_step(dtype, d, first, res_fp32):
    g = torch.Generator().manual_seed(d)
    hidden = torch.randn(3, 1, d, generator=g).to(dtype)
    residual = None if first else torch.randn(3, 1, d, generator=g).to(torch.float32 if res_fp32 else dtype)
    weight = (torch.rand(d, generator=g) + 0.5).to(dtype)
    with torch.no_grad():  # the decoding step
        out, res = add_norm.add_rms_norm_triton(hidden, residual, weight, 1e-5, res_fp32)
    ref_out, ref_res = _torch_add_norm(hidden, residual, weight, 1e-5, res_fp32)
    assert res.dtype == ref_res.dtype and out.dtype == ref_out.dtype
    assert out.shape == hidden.shape and res.shape == hidden.shape
    assert torch.equal(res, ref_res)  # the sum is exact
    assert rel_err(out, ref_out) < (1e-6 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim,width", [(1, 1), (5, 2), (37, 4), (300, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", [None, "silu"])
def test_conv1d_update(dtype, dim, width, bias, act):
    g = torch.Generator().manual_seed(dim * 10 + width)
    batch = 2
    xz = torch.randn(batch, 2 * dim, generator=g).to(dtype)
    x = xz[:, :dim]  # a strided view, as the decode step passes it
    state = torch.randn(batch, dim, width, generator=g).to(dtype)
    weight = torch.randn(dim, width, generator=g).to(dtype)
    b = torch.randn(dim, generator=g).to(dtype) if bias else None
    ref_state = state.clone()
    for _ in range(3):
        y = decode.conv1d_update_triton(x, state, weight, b, act)
        ref = causal_conv1d_update(x, ref_state, weight, b, act)  # CPU tensors: the PyTorch path
        assert torch.equal(state, ref_state)
        assert y.dtype == x.dtype and y.shape == (batch, dim)
        assert rel_err(y, ref) < (1e-6 if dtype == torch.float32 else 2e-3)
        x = torch.randn(batch, dim, generator=g).to(dtype)


def test_bad_arguments():
    with pytest.raises(MambaKitError, match="activation"):
        decode.conv1d_update_triton(torch.zeros(1, 2), torch.zeros(1, 2, 3), torch.zeros(2, 3), activation="relu")
    with pytest.raises(MambaKitError, match="weight"):
        decode.conv1d_update_triton(torch.zeros(1, 2), torch.zeros(1, 2, 3), torch.zeros(2, 4))
    with pytest.raises(MambaKitError, match="add_rms_norm"):
        add_norm.add_rms_norm_triton(torch.zeros(1, 4), None, torch.ones(5), 1e-5, True)
