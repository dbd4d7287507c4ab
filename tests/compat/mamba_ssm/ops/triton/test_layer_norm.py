"""layer_norm_fn / rms_norm_fn (residual, prenorm, residual_in_fp32) and the gated rmsnorm_fn / layernorm_fn of
mambakit.compat against float64 formulas written here (official float32 tolerance: atol 1e-4)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.compat.mamba_ssm.ops.triton.layer_norm import RMSNorm, layer_norm_fn, rms_norm_fn
from mambakit.compat.mamba_ssm.ops.triton.layernorm_gated import RMSNorm as GatedRMSNorm
from mambakit.compat.mamba_ssm.ops.triton.layernorm_gated import layernorm_fn, rmsnorm_fn
from mambakit.errors import MambaKitError

TOL = dict(rtol=1e-4, atol=1e-4)


def rms64(h, w, eps, b=None):
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    return out if b is None else out + b.double()


@pytest.mark.parametrize("is_rms", [True, False])
@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_residual_prenorm(is_rms, residual_in_fp32):
    torch.manual_seed(0)
    x, res = torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 3, 16)
    w, b = torch.rand(16) + 0.5, torch.randn(16)
    fn = rms_norm_fn if is_rms else (lambda *a, **k: layer_norm_fn(*a, **k, is_rms_norm=False))
    out, res_out = fn(x, w, b, residual=res, eps=1e-5, prenorm=True, residual_in_fp32=residual_in_fp32)
    h = x.double() + res.double()
    want = rms64(h, w, 1e-5, b) if is_rms else F.layer_norm(h, (16,), w.double(), b.double(), 1e-5)
    torch.testing.assert_close(out.double(), want, **TOL)
    torch.testing.assert_close(res_out.double(), h, **TOL)
    out.sum().backward()
    assert x.grad is not None


def test_residual_dtype_rules():
    x = torch.randn(4, 8).bfloat16()
    w = torch.ones(8)
    assert rms_norm_fn(x, w, None, prenorm=True, residual_in_fp32=True)[1].dtype == torch.float32
    assert rms_norm_fn(x, w, None, prenorm=True)[1].dtype == torch.bfloat16
    out, res = rms_norm_fn(x, w, None, residual=torch.randn(4, 8, dtype=torch.float64), prenorm=True)
    assert out.dtype == torch.bfloat16 and res.dtype == torch.float64
    assert isinstance(rms_norm_fn(x, w, None), torch.Tensor)


def test_module_forward():
    norm = RMSNorm(8, eps=1e-5)
    x, res = torch.randn(2, 8), torch.randn(2, 8)
    out, r = norm(x, residual=res, prenorm=True, residual_in_fp32=True)
    torch.testing.assert_close(out.double(), rms64(x.double() + res.double(), norm.weight.detach(), 1e-5), **TOL)


def test_parallel_norm_is_refused():
    with pytest.raises(MambaKitError, match="x1"):
        layer_norm_fn(torch.randn(2, 4), torch.ones(4), None, x1=torch.randn(2, 4))


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("is_rms", [True, False])
def test_gated_norms(norm_before_gate, group_size, is_rms):
    torch.manual_seed(1)
    x, z = torch.randn(3, 12), torch.randn(3, 12)
    w, b = torch.rand(12) + 0.5, torch.randn(12)
    fn = rmsnorm_fn if is_rms else layernorm_fn
    out = fn(x, w, b, z=z, eps=1e-6, group_size=group_size, norm_before_gate=norm_before_gate)
    h = x.double() if norm_before_gate else x.double() * F.silu(z.double())
    g = h.unflatten(-1, (-1, group_size or 12))
    if is_rms:
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6)
    else:
        g = (g - g.mean(-1, keepdim=True)) * torch.rsqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6)
    want = g.flatten(-2) * w.double() + b.double()
    if norm_before_gate:
        want = want * F.silu(z.double())
    torch.testing.assert_close(out.double(), want, **TOL)


def test_gated_module_defaults_to_norm_before_gate():
    norm = GatedRMSNorm(8)
    assert norm.norm_before_gate is True
    x, z = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(norm(x, z).double(), rms64(x.double(), norm.weight.detach(), 1e-5) * F.silu(z.double()),
                               **TOL)
