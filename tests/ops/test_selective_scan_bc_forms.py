"""The selective scan with B and C in different layouts (time-invariant (dim, d_state), (batch, d_state, seqlen),
grouped (batch, groups, d_state, seqlen), in any combination, as the official reference reads them): every form
(sequential, chunked, Triton under the interpreter) against a float64 loop over per-channel B/C written here."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mambakit.errors import MambaKitError
from mambakit.ops.selective_scan import selective_scan_chunked, selective_scan_fn, selective_scan_ref

BATCH, DIM, D_STATE, SEQLEN = 2, 6, 3, 11
LAYOUTS = ("invariant", "single", "groups2", "groups3")
PAIRS = [p for p in itertools.product(LAYOUTS, LAYOUTS)]
MIXED = [p for p in PAIRS if p[0] != p[1]]


def bc(layout: str, g: torch.Generator) -> torch.Tensor:
    shape = {"invariant": (DIM, D_STATE), "single": (BATCH, D_STATE, SEQLEN),
             "groups2": (BATCH, 2, D_STATE, SEQLEN), "groups3": (BATCH, 3, D_STATE, SEQLEN)}[layout]
    return torch.randn(shape, generator=g, dtype=torch.float64)


def per_channel(t: torch.Tensor) -> torch.Tensor:
    """Any layout -> (batch, dim, d_state, seqlen): the row each channel reads at each step."""
    if t.dim() == 2:
        return t[None, :, :, None].expand(BATCH, DIM, D_STATE, SEQLEN)
    if t.dim() == 3:
        t = t[:, None]
    channels_per_row = DIM // t.shape[1]
    return torch.stack([t[:, c // channels_per_row] for c in range(DIM)], dim=1)


def loop64(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The recurrence, one channel row at a time, in float64."""
    u, delta, A = u.double(), delta.double(), A.double()
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bc, Cc = per_channel(B.double()), per_channel(C.double())
    h = torch.zeros(BATCH, DIM, D_STATE, dtype=torch.float64)
    ys = []
    for t in range(SEQLEN):
        h = torch.exp(delta[..., t, None] * A) * h + (delta[..., t] * u[..., t])[..., None] * Bc[..., t]
        ys.append(torch.einsum("bdn,bdn->bd", h, Cc[..., t]))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def inputs(pair, seed, full=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    kw = dict(u=r(BATCH, DIM, SEQLEN), delta=0.5 * r(BATCH, DIM, SEQLEN) - 0.5,
              A=-torch.rand(DIM, D_STATE, generator=g, dtype=torch.float64) - 0.2, B=bc(pair[0], g), C=bc(pair[1], g),
              D=r(DIM) if full else None, z=r(BATCH, DIM, SEQLEN) if full else None,
              delta_bias=0.3 * r(DIM) if full else None)
    kw = {k: (v.to(dtype).requires_grad_() if v is not None else None) for k, v in kw.items()}
    kw["delta_softplus"] = full
    return kw


def check(fn, kw, tol):
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    y, last = fn(**kw, return_last_state=True)
    want, want_last = loop64(**kw)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), want, **tol)
    torch.testing.assert_close(last.double(), want_last, **tol)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(want.shape, generator=g, dtype=torch.float64)
    gs = torch.randn(want_last.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((y.double() * gy).sum() + (last.double() * gs).sum(), [kw[n] for n in names])
    kw64 = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    yr, lr = loop64(**kw64)
    ref = torch.autograd.grad((yr * gy).sum() + (lr * gs).sum(), [kw64[n] for n in names])
    for n, a, b in zip(names, got, ref):
        assert a.shape == kw[n].shape, n
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, n=n: f"d{n}: {m}")


FP32 = dict(rtol=6e-4, atol=2e-3)  # the official float32 tolerances


@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
@pytest.mark.parametrize("full", [True, False], ids=["z-D-bias-softplus", "bare"])
@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_chunked, selective_scan_fn],
                         ids=["ref", "chunked", "dispatch"])
def test_every_bc_pair_fp32(pair, full, fn):
    check(fn, inputs(pair, seed=LAYOUTS.index(pair[0]) * 4 + LAYOUTS.index(pair[1]), full=full), FP32)


@pytest.mark.parametrize("pair", MIXED[:4], ids=["-".join(p) for p in MIXED[:4]])
def test_mixed_pairs_fp64_exact(pair):
    check(selective_scan_chunked, inputs(pair, seed=7, dtype=torch.float64), dict(rtol=1e-10, atol=1e-10))


@pytest.mark.parametrize("pair", [("groups2", "groups3"), ("groups3", "single")])
def test_regrouping_copies_nothing_into_the_inputs(pair):
    kw = inputs(pair, seed=3)
    before = (kw["B"].detach().clone(), kw["C"].detach().clone())
    selective_scan_fn(**kw)
    assert torch.equal(kw["B"], before[0]) and torch.equal(kw["C"], before[1])


def test_bad_bc_shapes_name_the_argument():
    kw = inputs(("invariant", "single"), seed=2, full=False)
    for name, bad in (("B", torch.randn(DIM + 1, D_STATE)), ("C", torch.randn(BATCH, 4, D_STATE, SEQLEN)),
                      ("B", torch.randn(BATCH, D_STATE, SEQLEN + 1)), ("C", torch.randn(DIM, D_STATE, 1, 1, 1))):
        with pytest.raises(MambaKitError, match=rf"{name} must have shape .*time-invariant \(dim=6, d_state=3\)"):
            selective_scan_fn(**dict(kw, **{name: bad}))
