"""Complex A in the selective scan against a float64 evaluation on real (re, im) pairs written here: outputs, last
states, gradients (gradcheck in complex128, and the Wirtinger convention of the official reference)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.errors import MambaKitError
from mambakit.ops.selective_scan import selective_scan_fn, selective_scan_ref


def pairs_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, h0=None, seq_idx=None):
    """The recurrence on real pairs (rotation and scaling by exp(delta A)); B, C real (..., d_state, seqlen, 2).

    Returns y (batch, dim, seqlen) and the last state as (re, im) (batch, dim, d_state) float64 tensors.
    """
    f = torch.float64
    u, delta = u.to(f), delta.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, seqlen = u.shape
    ar, ai = A.real.to(f), A.imag.to(f)
    if B.dim() == 4:  # (batch, d_state, seqlen, 2) -> one group
        B, C = B[:, None], C[:, None]
    rep = dim // B.shape[1]
    Br, Bi = B[..., 0].to(f).repeat_interleave(rep, 1), B[..., 1].to(f).repeat_interleave(rep, 1)
    Cr, Ci = C[..., 0].to(f).repeat_interleave(rep, 1), C[..., 1].to(f).repeat_interleave(rep, 1)
    hr = torch.zeros(batch, dim, A.shape[1], dtype=f) if h0 is None else h0.real.to(f)
    hi = torch.zeros(batch, dim, A.shape[1], dtype=f) if h0 is None else h0.imag.to(f)
    ys = []
    for t in range(seqlen):
        d = delta[:, :, t, None]
        mag, ang = torch.exp(d * ar), d * ai
        cos, sin = mag * torch.cos(ang), mag * torch.sin(ang)
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(f)[:, None, None]
            cos, sin = cos * keep, sin * keep
        du = (d[..., 0] * u[:, :, t])[:, :, None]
        hr, hi = cos * hr - sin * hi + du * Br[..., t], sin * hr + cos * hi + du * Bi[..., t]
        ys.append(2 * (Cr[..., t] * hr - Ci[..., t] * hi).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D.to(f)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(f))
    return y, (hr, hi)


def make(batch=2, dim=4, d_state=3, seqlen=7, groups=0, dtype=torch.float64, seed=0, h0=False, packed=False):
    """Inputs with B, C as real pairs (..., d_state, seqlen, 2); complex A with a negative real part."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    lead = (batch,) if groups == 0 else (batch, groups)
    A = torch.complex(-torch.rand(dim, d_state, generator=g, dtype=torch.float64) - 0.1,
                      torch.randn(dim, d_state, generator=g, dtype=torch.float64) * 2)
    kw = dict(u=r(batch, dim, seqlen), delta=r(batch, dim, seqlen, scale=0.5),
              A=A.to(torch.complex128 if dtype == torch.float64 else torch.complex64),
              B=r(*lead, d_state, seqlen, 2), C=r(*lead, d_state, seqlen, 2), D=r(dim), z=r(batch, dim, seqlen),
              delta_bias=r(dim, scale=0.3))
    if h0:
        kw["h0"] = torch.complex(r(batch, dim, d_state), r(batch, dim, d_state))
    if packed:
        kw["seq_idx"] = (torch.arange(seqlen)[None, :] >= torch.tensor([[seqlen // 2], [1]])[:batch]).to(torch.int32)
    return kw


def call(kw, interleaved=True, backend="auto", **extra):
    """selective_scan_fn on `make`'s inputs, B/C passed interleaved along time (real) or as complex tensors."""
    B, C = kw["B"], kw["C"]
    if interleaved:
        B, C = B.flatten(-2), C.flatten(-2)  # (..., d_state, 2 * seqlen): (re, im) pairs along time
    else:
        B, C = torch.view_as_complex(B.contiguous()), torch.view_as_complex(C.contiguous())
    return selective_scan_fn(kw["u"], kw["delta"], kw["A"], B, C, kw["D"], kw["z"], kw["delta_bias"], True,
                             True, kw.get("h0"), kw.get("seq_idx"), backend=backend, **extra)


@pytest.mark.parametrize("shape,groups,h0,packed", [
    ((2, 4, 3, 7), 0, False, False),
    ((1, 6, 1, 1), 0, True, False),
    ((2, 6, 5, 9), 3, True, True),
])
@pytest.mark.parametrize("interleaved", [True, False])
def test_forward_and_last_state_match_the_pairs_evaluation(shape, groups, h0, packed, interleaved):
    kw = make(*shape, groups=groups, h0=h0, packed=packed)
    y_ref, (hr, hi) = pairs_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                                 kw["delta_bias"], True, kw.get("h0"), kw.get("seq_idx"))
    for backend in ("auto", "torch", "ref"):
        y, last = call(kw, interleaved, backend)
        assert y.dtype == torch.float64 and last.dtype == torch.complex128
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(last, torch.complex(hr, hi), rtol=1e-10, atol=1e-10)


def test_float32_inputs_give_float32_output_and_a_complex64_state():
    kw = make(dtype=torch.float32)
    y, last = call(kw)
    assert y.dtype == torch.float32 and last.dtype == torch.complex64
    y_ref, _ = pairs_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"], True)
    torch.testing.assert_close(y.double(), y_ref, rtol=6e-4, atol=2e-3)  # the official float32 tolerances


@pytest.mark.parametrize("interleaved", [True, False])
def test_gradcheck_complex128(interleaved):
    kw = make(batch=1, dim=2, d_state=2, seqlen=3, h0=True)
    B, C = kw["B"].flatten(-2), kw["C"].flatten(-2)
    if not interleaved:
        B, C = torch.view_as_complex(kw["B"].contiguous()), torch.view_as_complex(kw["C"].contiguous())
    args = [kw["u"], kw["delta"], kw["A"], B, C, kw["D"], kw["z"], kw["delta_bias"], kw["h0"]]
    args = [a.clone().requires_grad_() for a in args]

    def fn(u, delta, A, B, C, D, z, bias, h0):
        return selective_scan_fn(u, delta, A, B, C, D, z, bias, True, True, h0)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


def test_gradients_follow_the_official_convention():
    """For a real loss, A.grad = dL/dRe(A) + i dL/dIm(A) (PyTorch's convention, which the official reference's
    autograd gives), checked against autograd through the real pairs evaluation."""
    kw = make(seqlen=6, groups=2, dim=4, h0=True)
    Ar = kw["A"].real.clone().requires_grad_()
    Ai = kw["A"].imag.clone().requires_grad_()
    Bp = kw["B"].clone().requires_grad_()
    y_ref, (hr, hi) = pairs_scan(kw["u"], kw["delta"], torch.complex(Ar, Ai), Bp, kw["C"], kw["D"], kw["z"],
                                 kw["delta_bias"], True, kw["h0"])
    g = torch.Generator().manual_seed(5)
    gy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    Ar_g, Ai_g, B_g = torch.autograd.grad((y_ref * gy).sum() + hr.sum() - hi.sum(), [Ar, Ai, Bp])
    A = kw["A"].clone().requires_grad_()
    B = kw["B"].flatten(-2).clone().requires_grad_()
    y, last = selective_scan_fn(kw["u"], kw["delta"], A, B, kw["C"].flatten(-2), kw["D"], kw["z"],
                                kw["delta_bias"], True, True, kw["h0"])
    A_g, Bi_g = torch.autograd.grad((y * gy).sum() + last.real.sum() - last.imag.sum(), [A, B])
    torch.testing.assert_close(A_g, torch.complex(Ar_g, Ai_g), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(Bi_g, B_g.flatten(-2), rtol=1e-9, atol=1e-9)


def test_complex_A_errors_name_the_argument():
    kw = make()
    u, delta, A = kw["u"], kw["delta"], kw["A"]
    B = kw["B"].flatten(-2)
    with pytest.raises(MambaKitError, match="backend='triton'"):
        selective_scan_fn(u, delta, A, B, B, backend="triton")
    with pytest.raises(MambaKitError, match=r"B must be complex .* 2 \* seqlen=14"):
        selective_scan_fn(u, delta, A, B[..., :7], B)
    with pytest.raises(MambaKitError, match="delta must be real"):
        selective_scan_ref(u, delta.to(torch.complex128), A, B, B)
    with pytest.raises(MambaKitError, match="initial_state must have shape"):
        selective_scan_ref(u, delta, A, B, B, initial_state=torch.zeros(2, 4, 2, dtype=torch.complex128))
