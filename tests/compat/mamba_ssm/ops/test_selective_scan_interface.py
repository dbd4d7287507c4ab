"""selective_scan_fn / selective_scan_ref / mamba_inner_fn of mambakit.compat against float64 loops written here.
Tolerances: the official tests' for float32 (rtol 6e-4, atol 2e-3)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.compat.mamba_ssm.ops.selective_scan_interface import (
    mamba_inner_fn, mamba_inner_ref, selective_scan_fn, selective_scan_ref,
)
from mambakit.errors import MambaKitError

TOL = dict(rtol=6e-4, atol=2e-3)


def scan_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """h_t = exp(delta A) h + delta B u; y = <C, h> + D u, gated by silu(z); float64; B, C in any official layout.
    Complex A: complex128 state, B, C complex (varying ones given as complex tensors here), y = 2 Re <C, h> + D u."""
    u, delta = u.double(), delta.double()
    A = A.to(torch.complex128) if A.is_complex() else A.double()
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, seqlen = u.shape

    def at(M, t):  # (batch, dim, d_state) at step t
        M = M.to(A.dtype)
        if M.dim() == 2:
            return M[None].expand(batch, -1, -1)
        if M.dim() == 3:
            return M[:, None, :, t].expand(-1, dim, -1)
        return M[..., t].repeat_interleave(dim // M.shape[1], dim=1)

    h = torch.zeros(batch, dim, A.shape[1], dtype=A.dtype)
    ys = []
    for t in range(seqlen):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * at(B, t)
        ys.append((h * at(C, t)).sum(-1))
    y = torch.stack(ys, -1)
    if y.is_complex():
        y = 2 * y.real
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def inputs(layout, seed=0, batch=2, dim=6, d_state=4, seqlen=9):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, seqlen, generator=g)
    delta = torch.randn(batch, dim, seqlen, generator=g) * 0.5
    A = -torch.rand(dim, d_state, generator=g) - 0.5
    shape = {"variable": (batch, d_state, seqlen), "grouped": (batch, 3, d_state, seqlen),
             "invariant": (dim, d_state)}[layout]
    B, C = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    D, z, bias = torch.randn(dim, generator=g), torch.randn(batch, dim, seqlen, generator=g), torch.randn(dim, generator=g)
    return u, delta, A, B, C, D, z, bias


@pytest.mark.parametrize("layout", ["variable", "grouped", "invariant"])
@pytest.mark.parametrize("fn", [selective_scan_fn, selective_scan_ref], ids=["fn", "ref"])
def test_scan_forward_backward_and_last_state(layout, fn):
    u, delta, A, B, C, D, z, bias = (t.requires_grad_() for t in inputs(layout))
    y, last = fn(u, delta, A, B, C, D, z, bias, True, return_last_state=True)
    want, want_last = scan_loop(u, delta, A, B, C, D, z, bias, True)
    torch.testing.assert_close(y.double(), want, **TOL)
    torch.testing.assert_close(last.double(), want_last, **TOL)
    g = torch.randn_like(want)
    leaves = (u, delta, A, B, C, D, z, bias)
    grads = torch.autograd.grad((y.double() * g).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    refs = torch.autograd.grad((scan_loop(*leaves64, True)[0] * g).sum(), leaves64)
    for got, ref in zip(grads, refs):
        torch.testing.assert_close(got.double(), ref, **TOL)


def test_positional_order_is_the_official_one():
    u, delta, A, B, C, D, z, bias = inputs("variable", seed=1)
    y = selective_scan_fn(u, delta, A, B, C, D, z, bias, True, False)
    torch.testing.assert_close(y.double(), scan_loop(u, delta, A, B, C, D, z, bias, True)[0], **TOL)


def complex_inputs(layout, seed=3, batch=2, dim=6, d_state=4, seqlen=9):
    """Official complex-A inputs: varying B, C real (..., d_state, 2 * seqlen), (re, im) pairs along time;
    time-invariant ones complex (dim, d_state). Also returns B, C as complex tensors for `scan_loop`."""
    u, delta, A, _, _, D, z, bias = inputs("variable", seed, batch, dim, d_state, seqlen)
    g = torch.Generator().manual_seed(seed + 1)
    A = torch.complex(A, torch.randn(A.shape, generator=g))
    if layout == "invariant":
        B, C = (torch.randn(dim, d_state, generator=g, dtype=torch.complex64) for _ in range(2))
        return (u, delta, A, B, C, D, z, bias), (B, C)
    lead = (batch,) if layout == "variable" else (batch, 3)
    B, C = (torch.randn(*lead, d_state, 2 * seqlen, generator=g) for _ in range(2))
    as_complex = lambda t: torch.view_as_complex(t.double().unflatten(-1, (seqlen, 2)))  # noqa: E731
    return (u, delta, A, B, C, D, z, bias), (as_complex(B), as_complex(C))


@pytest.mark.parametrize("layout", ["variable", "grouped", "invariant"])
@pytest.mark.parametrize("fn", [selective_scan_fn, selective_scan_ref], ids=["fn", "ref"])
def test_complex_A_forward_backward_and_last_state(layout, fn):
    args, (Bc, Cc) = complex_inputs(layout)
    u, delta, A, B, C, D, z, bias = (t.requires_grad_() for t in args)
    y, last = fn(u, delta, A, B, C, D, z, bias, True, return_last_state=True)
    assert y.dtype == torch.float32 and last.dtype == torch.complex64 and last.shape == (2, 6, 4)
    want, want_last = scan_loop(u, delta, A, Bc, Cc, D, z, bias, True)
    torch.testing.assert_close(y.double(), want, **TOL)
    torch.testing.assert_close(last.to(torch.complex128), want_last, **TOL)
    g = torch.randn_like(want)
    leaves = (u, delta, A, D, z, bias)
    grads = torch.autograd.grad((y.double() * g).sum(), leaves)
    leaves64 = [t.detach().to(torch.complex128 if t.is_complex() else torch.float64).requires_grad_()
                for t in leaves]
    u6, d6, A6, D6, z6, b6 = leaves64
    refs = torch.autograd.grad((scan_loop(u6, d6, A6, Bc, Cc, D6, z6, b6, True)[0] * g).sum(), leaves64)
    for got, ref in zip(grads, refs):
        torch.testing.assert_close(got.to(ref.dtype), ref, **TOL)


def inner_weights(seed=0, d_model=8, dim=12, d_state=4, rank=3, width=4):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.3: (torch.randn(*s, generator=g) * scale).requires_grad_()  # noqa: E731
    return dict(conv1d_weight=r(dim, 1, width), conv1d_bias=r(dim), x_proj_weight=r(rank + 2 * d_state, dim),
                delta_proj_weight=r(dim, rank), out_proj_weight=r(d_model, dim), out_proj_bias=r(d_model),
                A=(-torch.rand(dim, d_state, generator=g) - 0.5).requires_grad_(), D=r(dim), delta_bias=r(dim))


def inner_loop(xz, w, b_rms=None, eps=1e-6):
    """The inner path in float64, written out step by step."""
    w = {k: v.detach().to(torch.complex128 if v.is_complex() else torch.float64) for k, v in w.items()}
    xz = xz.double()
    x, z = xz.chunk(2, dim=1)
    width = w["conv1d_weight"].shape[-1]
    x = F.conv1d(F.pad(x, (width - 1, 0)), w["conv1d_weight"], w["conv1d_bias"], groups=x.shape[1])
    x = F.silu(x)
    rank, d_state = w["delta_proj_weight"].shape[1], w["A"].shape[1] * (2 if w["A"].is_complex() else 1)
    x_dbl = x.transpose(1, 2) @ w["x_proj_weight"].T
    delta = (x_dbl[..., :rank] @ w["delta_proj_weight"].T).transpose(1, 2)
    B, C = x_dbl[..., rank:rank + d_state], x_dbl[..., -d_state:]
    if b_rms is not None:
        B = B * torch.rsqrt(B.pow(2).mean(-1, keepdim=True) + eps) * b_rms.double()
    if w["A"].is_complex():  # x_proj gives (re, im) pairs per state
        B, C = (torch.view_as_complex(t.unflatten(-1, (-1, 2)).contiguous()) for t in (B, C))
    y, _ = scan_loop(x, delta, w["A"], B.transpose(1, 2), C.transpose(1, 2), w["D"], z, w["delta_bias"], True)
    return y.transpose(1, 2) @ w["out_proj_weight"].T + w["out_proj_bias"]


@pytest.mark.parametrize("fn", [mamba_inner_fn, mamba_inner_ref], ids=["fn", "ref"])
def test_mamba_inner_matches_the_composition(fn):
    w = inner_weights()
    xz = torch.randn(2, 24, 10).requires_grad_()
    out = fn(xz, w["conv1d_weight"], w["conv1d_bias"], w["x_proj_weight"], w["delta_proj_weight"],
             w["out_proj_weight"], w["out_proj_bias"], w["A"], None, None, w["D"], w["delta_bias"])
    assert out.shape == (2, 10, 8)
    torch.testing.assert_close(out.double(), inner_loop(xz, w), **TOL)
    out.sum().backward()
    xz64 = xz.detach().double().requires_grad_()
    inner_loop(xz64, w).sum().backward()
    torch.testing.assert_close(xz.grad.double(), xz64.grad, **TOL)
    assert all(v.grad is not None for v in w.values())


def test_mamba_inner_b_rms_weight():
    w = inner_weights(seed=2)
    b_rms = torch.rand(4) + 0.5
    xz = torch.randn(1, 24, 6)
    out = mamba_inner_fn(xz, **w, b_rms_weight=b_rms)
    torch.testing.assert_close(out.double(), inner_loop(xz, w, b_rms=b_rms), **TOL)


@pytest.mark.parametrize("fn", [mamba_inner_fn, mamba_inner_ref], ids=["fn", "ref"])
def test_mamba_inner_with_complex_A(fn):
    """Complex A (dim, d_state): x_proj gives 2 * d_state features each for B and C, (re, im) pairs, as official."""
    w = inner_weights(seed=4, d_state=4)  # x_proj: rank + 2 * 4 features = B and C of 2 complex states
    g = torch.Generator().manual_seed(9)
    A = torch.complex(-torch.rand(12, 2, generator=g) - 0.5, torch.randn(12, 2, generator=g)).requires_grad_()
    w["A"] = A
    xz = torch.randn(2, 24, 7, generator=g).requires_grad_()
    out = fn(xz, w["conv1d_weight"], w["conv1d_bias"], w["x_proj_weight"], w["delta_proj_weight"],
             w["out_proj_weight"], w["out_proj_bias"], A, None, None, w["D"], w["delta_bias"])
    assert out.shape == (2, 7, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), inner_loop(xz, w), **TOL)
    out.sum().backward()
    assert A.grad is not None and A.grad.is_complex() and xz.grad is not None
