"""The SSD form's fused bias + rotation + own-position product kernels (mambakit.ops.mamba3.triton_rotary) against
PyTorch in float64, forward and every gradient, on the CPU interpreter: groups, both rope fractions, odd sizes,
strided inputs, 16-bit outputs."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are (re)loaded: kernels run on the CPU interpreter

import pytest  # noqa: E402

pytest.importorskip("triton")

import math  # noqa: E402

import torch  # noqa: E402

from mambakit.ops.mamba3.common import heads_of_groups, rotate  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.ops.triton import interpreted_module  # noqa: E402

kernels = interpreted_module("mambakit.ops.mamba3.triton_rotary")


def _reference(Q, K, Q_bias, K_bias, theta):
    H = Q_bias.shape[0]
    q = rotate(heads_of_groups(Q, H) + Q_bias, theta)
    k = rotate(heads_of_groups(K, H) + K_bias, theta)
    return q, k, (q * k).sum(-1)


def _inputs(batch, seqlen, ngroups, nheads, N, S, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    theta = torch.rand(batch, seqlen, nheads, S, generator=g, dtype=torch.float64) * 2 * math.pi
    return randn(batch, seqlen, ngroups, N), randn(batch, seqlen, ngroups, N), randn(nheads, N), randn(nheads, N), \
        theta


SHAPES = [
    dict(batch=2, seqlen=37, ngroups=2, nheads=4, N=8, S=2),  # rope fraction 0.5
    dict(batch=1, seqlen=70, ngroups=1, nheads=3, N=12, S=6),  # all dims rotated
    dict(batch=2, seqlen=5, ngroups=3, nheads=3, N=7, S=3),  # odd d_state: one unrotated dim
]


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_pytorch(shape):
    args64 = _inputs(**shape)
    leaves64 = [a.clone().requires_grad_(True) for a in args64]
    ref = _reference(*leaves64)
    leaves32 = [a.float().requires_grad_(True) for a in args64]
    out = kernels.rotary_qk(*leaves32, dtype=torch.float32)
    for a, b in zip(out, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert rel_err(a, b) < 1e-6
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in ref]
    grads_ref = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, ws)), leaves64)
    grads = torch.autograd.grad(sum((o.double() * w).sum() for o, w in zip(out, ws)), leaves32)
    for name, a, b in zip(("Q", "K", "Q_bias", "K_bias", "theta"), grads, grads_ref):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5, name


def test_strided_inputs_and_half_outputs():
    Q, K, qb, kb, theta = _inputs(batch=2, seqlen=20, ngroups=1, nheads=2, N=8, S=4)
    packed = torch.cat((Q, K), dim=-1).float()  # Q and K as strided views of one projection
    q, k, qk = kernels.rotary_qk(packed[..., :8], packed[..., 8:], qb.float(), kb.float(), theta.float(),
                                 dtype=torch.float16)
    rq, rk, _ = _reference(Q, K, qb, kb, theta)
    assert q.dtype == torch.float16 and rel_err(q, rq) < 1e-3 and rel_err(k, rk) < 1e-3
    assert rel_err(qk, (q.double() * k.double()).sum(-1)) < 1e-6  # the product of the rounded outputs


@pytest.mark.parametrize("shape", SHAPES)
def test_folded_rms_norm_matches_pytorch(shape):
    """norm=(q_weight, k_weight, eps): RMSNorm of Q and K over d_state before the bias and rotation; forward and every
    gradient (the weights' too) against the PyTorch composition, float32 inputs from strided in_proj-like slices."""
    from mambakit.ops.norm.naive import rms_norm_torch

    Q, K, Q_bias, K_bias, theta = _inputs(**shape, seed=4)
    g = torch.Generator().manual_seed(5)
    wq, wk = (1 + 0.3 * torch.randn(shape["N"], generator=g, dtype=torch.float64) for _ in range(2))
    packed = torch.cat((Q, K), dim=-1)  # Q and K as column slices of one tensor
    args64 = [packed, Q_bias, K_bias, theta, wq, wk]
    leaves64 = [a.clone().requires_grad_(True) for a in args64]
    leaves32 = [a.float().requires_grad_(True) for a in args64]
    N = shape["N"]

    def ref_fn(p, qb, kb, th, wq, wk):
        return _reference(rms_norm_torch(p[..., :N], wq, 1e-5), rms_norm_torch(p[..., N:], wk, 1e-5), qb, kb, th)

    ref = ref_fn(*leaves64)
    p32, qb32, kb32, th32, wq32, wk32 = leaves32
    out = kernels.rotary_qk(p32[..., :N], p32[..., N:], qb32, kb32, th32, torch.float32, norm=(wq32, wk32, 1e-5))
    for a, b in zip(out, ref):
        assert rel_err(a, b) < 1e-6
    ws = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in ref]
    grads_ref = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, ws)), leaves64)
    grads = torch.autograd.grad(sum((o * w.float()).sum() for o, w in zip(out, ws)), leaves32)
    for name, a, b in zip(("QK", "Q_bias", "K_bias", "theta", "q_weight", "k_weight"), grads, grads_ref):
        assert rel_err(a, b) < 1e-5, name
