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


def inputs(layout, seed=0, batch=2, dim=6, d_state=4, seqlen=9, c_layout=None):
    """Official-layout inputs; B in `layout`, C in `c_layout` (default: the same)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, seqlen, generator=g)
    delta = torch.randn(batch, dim, seqlen, generator=g) * 0.5
    A = -torch.rand(dim, d_state, generator=g) - 0.5
    shapes = {"variable": (batch, d_state, seqlen), "grouped": (batch, 3, d_state, seqlen),
              "grouped2": (batch, 2, d_state, seqlen), "invariant": (dim, d_state)}
    B, C = torch.randn(shapes[layout], generator=g), torch.randn(shapes[c_layout or layout], generator=g)
    D, z, bias = (torch.randn(dim, generator=g), torch.randn(batch, dim, seqlen, generator=g),
                  torch.randn(dim, generator=g))
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


def check_scan(fn, args, delta_softplus):
    """fn's output, last state and every gradient against scan_loop (float64) at the official tolerances; None
    arguments stay None."""
    y, last = fn(*args, delta_softplus, return_last_state=True)
    want, want_last = scan_loop(*args, delta_softplus)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), want, **TOL)
    torch.testing.assert_close(last.double(), want_last, **TOL)
    g = torch.randn_like(want)
    leaves = [t for t in args if t is not None]
    grads = torch.autograd.grad((y.double() * g).sum(), leaves)
    args64 = [t.detach().double().requires_grad_() if t is not None else None for t in args]
    refs = torch.autograd.grad((scan_loop(*args64, delta_softplus)[0] * g).sum(), [t for t in args64 if t is not None])
    for got, ref, leaf in zip(grads, refs, leaves):
        assert got.shape == leaf.shape
        torch.testing.assert_close(got.double(), ref, **TOL)


BC_LAYOUTS = ["invariant", "variable", "grouped", "grouped2"]
BC_PAIRS = [(b, c) for b in BC_LAYOUTS for c in BC_LAYOUTS]


@pytest.mark.parametrize("pair", BC_PAIRS, ids=["B_%s-C_%s" % p for p in BC_PAIRS])
@pytest.mark.parametrize("full", [True, False], ids=["z-D-bias-softplus", "bare"])
@pytest.mark.parametrize("fn", [selective_scan_fn, selective_scan_ref], ids=["fn", "ref"])
def test_every_combination_of_B_and_C_forms(pair, full, fn):
    """As official: B and C each time-invariant (dim, d_state), (batch, d_state, seqlen) or grouped, in any mix."""
    u, delta, A, B, C, D, z, bias = (t.requires_grad_() for t in inputs(pair[0], seed=5, c_layout=pair[1]))
    args = (u, delta, A, B, C, D, z, bias) if full else (u, delta, A, B, C, None, None, None)
    check_scan(fn, args, delta_softplus=full)


OPTIONS = [(has_z, has_D, has_bias, softplus) for has_z in (0, 1) for has_D in (0, 1) for has_bias in (0, 1)
           for softplus in (0, 1)]


@pytest.mark.parametrize("options", OPTIONS, ids=["z%d-D%d-bias%d-softplus%d" % o for o in OPTIONS])
@pytest.mark.parametrize("pair", [("invariant", "variable"), ("grouped", "invariant")], ids=["B_inv-C_var",
                                                                                            "B_grp-C_inv"])
def test_mixed_forms_with_each_option(options, pair):
    has_z, has_D, has_bias, softplus = options
    u, delta, A, B, C, D, z, bias = (t.requires_grad_() for t in inputs(pair[0], seed=6, c_layout=pair[1]))
    check_scan(selective_scan_fn, (u, delta, A, B, C, D if has_D else None, z if has_z else None,
                                   bias if has_bias else None), bool(softplus))


def complex_inputs(layout, seed=3, batch=2, dim=6, d_state=4, seqlen=9, c_layout=None):
    """Official complex-A inputs: varying B, C real (..., d_state, 2 * seqlen), (re, im) pairs along time;
    time-invariant ones complex (dim, d_state); C in `c_layout` (default: B's). Also returns B, C as complex tensors
    for `scan_loop`."""
    u, delta, A, _, _, D, z, bias = inputs("variable", seed, batch, dim, d_state, seqlen)
    g = torch.Generator().manual_seed(seed + 1)
    A = torch.complex(A, torch.randn(A.shape, generator=g))
    as_complex = lambda t: torch.view_as_complex(t.double().unflatten(-1, (seqlen, 2)))  # noqa: E731

    def one(kind):
        if kind == "invariant":
            t = torch.randn(dim, d_state, generator=g, dtype=torch.complex64)
            return t, t
        lead = (batch,) if kind == "variable" else (batch, 3)
        t = torch.randn(*lead, d_state, 2 * seqlen, generator=g)
        return t, as_complex(t)

    (B, Bc), (C, Cc) = one(layout), one(c_layout or layout)
    return (u, delta, A, B, C, D, z, bias), (Bc, Cc)


COMPLEX_PAIRS = [(b, c) for b in ("variable", "grouped", "invariant") for c in ("variable", "grouped", "invariant")]


@pytest.mark.parametrize("pair", COMPLEX_PAIRS, ids=["B_%s-C_%s" % p for p in COMPLEX_PAIRS])
@pytest.mark.parametrize("fn", [selective_scan_fn, selective_scan_ref], ids=["fn", "ref"])
def test_complex_A_forward_backward_and_last_state(pair, fn):
    """Complex A with B and C in every mix of the official complex forms."""
    args, (Bc, Cc) = complex_inputs(pair[0], c_layout=pair[1])
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


def inner_loop(xz, w, b_rms=None, eps=1e-6, B=None, C=None, detach=True):
    """The inner path in float64, written out step by step; B, C given (time-invariant (dim, d_state)) replace
    x_proj's. detach=False keeps the graph to float64 leaves passed in (for reference gradients)."""
    w = {k: (v.detach() if detach else v).to(torch.complex128 if v.is_complex() else torch.float64)
         for k, v in w.items()}
    xz = xz.double()
    x, z = xz.chunk(2, dim=1)
    width = w["conv1d_weight"].shape[-1]
    x = F.conv1d(F.pad(x, (width - 1, 0)), w["conv1d_weight"], w["conv1d_bias"], groups=x.shape[1])
    x = F.silu(x)
    rank, d_state = w["delta_proj_weight"].shape[1], w["A"].shape[1] * (2 if w["A"].is_complex() else 1)
    x_dbl = x.transpose(1, 2) @ w["x_proj_weight"].T
    delta = (x_dbl[..., :rank] @ w["delta_proj_weight"].T).transpose(1, 2)
    B_given, C_given = B, C
    B, C = x_dbl[..., rank:rank + d_state], x_dbl[..., -d_state:]
    if b_rms is not None:
        B = B * torch.rsqrt(B.pow(2).mean(-1, keepdim=True) + eps) * b_rms.double()
    if w["A"].is_complex():  # x_proj gives (re, im) pairs per state
        B, C = (torch.view_as_complex(t.unflatten(-1, (-1, 2)).contiguous()) for t in (B, C))
    B_bc = B.transpose(1, 2) if B_given is None else B_given.double()
    C_bc = C.transpose(1, 2) if C_given is None else C_given.double()
    y, _ = scan_loop(x, delta, w["A"], B_bc, C_bc, w["D"], z, w["delta_bias"], True)
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


@pytest.mark.parametrize("given", ["B", "C", "BC"])
@pytest.mark.parametrize("fn", [mamba_inner_fn, mamba_inner_ref], ids=["fn", "ref"])
def test_mamba_inner_with_time_invariant_B_or_C(given, fn):
    """As official: a B or C passed in is time-invariant (dim, d_state); the other comes from x_proj (varying)."""
    w = inner_weights(seed=5)
    g = torch.Generator().manual_seed(6)
    B = torch.randn(12, 4, generator=g).requires_grad_() if "B" in given else None
    C = torch.randn(12, 4, generator=g).requires_grad_() if "C" in given else None
    xz = torch.randn(2, 24, 9, generator=g).requires_grad_()
    out = fn(xz, w["conv1d_weight"], w["conv1d_bias"], w["x_proj_weight"], w["delta_proj_weight"],
             w["out_proj_weight"], w["out_proj_bias"], w["A"], B, C, w["D"], w["delta_bias"])
    torch.testing.assert_close(out.double(), inner_loop(xz, w, B=B, C=C), **TOL)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    given_t = [t for t in (B, C) if t is not None]
    grads = torch.autograd.grad((out.double() * gout).sum(), [xz, w["A"], w["x_proj_weight"], *given_t])
    xz64 = xz.detach().double().requires_grad_()
    w64 = {k: v.detach().double().requires_grad_() for k, v in w.items()}
    B64, C64 = (t.detach().double().requires_grad_() if t is not None else None for t in (B, C))
    out64 = inner_loop(xz64, w64, B=B64, C=C64, detach=False)
    refs = torch.autograd.grad((out64 * gout).sum(), [xz64, w64["A"], w64["x_proj_weight"],
                                                      *[t for t in (B64, C64) if t is not None]])
    for got, ref in zip(grads, refs):
        torch.testing.assert_close(got.double(), ref, **TOL)


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
