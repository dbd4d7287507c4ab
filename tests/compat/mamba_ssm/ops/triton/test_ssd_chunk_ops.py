"""The chunk-level SSD names of mamba_ssm (ssd_chunk_state, ssd_state_passing, ssd_chunk_scan) and the non-combined
forms of ssd_combined (mamba_chunk_scan, ssd_chunk_scan_combined_ref, ssd_selective_scan, mamba_conv1d_scan_ref)
against float64 loops written here, one position at a time; chunk sizes that do not divide seqlen. Forward at the
official float32 tolerances; gradients in float64 against the loops' autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.compat.mamba_ssm.ops.triton.ssd_chunk_scan import chunk_scan, chunk_scan_ref
from mambakit.compat.mamba_ssm.ops.triton.ssd_chunk_state import chunk_state, chunk_state_ref, chunk_state_varlen
from mambakit.compat.mamba_ssm.ops.triton.ssd_combined import (
    mamba_chunk_scan, mamba_conv1d_scan_ref, ssd_chunk_scan_combined_ref, ssd_selective_scan,
)
from mambakit.compat.mamba_ssm.ops.triton.ssd_state_passing import state_passing, state_passing_ref
from mambakit.errors import MambaKitError
from tests.compat.causal_conv1d.test_causal_conv1d_interface import conv_loop
from tests.compat.mamba_ssm.ops.triton.test_ssd_combined import TOL, ssd_loop

BATCH, SEQLEN, NHEADS, HEADDIM, NGROUPS, DSTATE, Q = 2, 11, 4, 3, 2, 5, 4
NCHUNKS = -(-SEQLEN // Q)


def chunked_inputs(dtype=torch.float64, seed=0, seqlen=SEQLEN, batch=BATCH):
    """B, C, x, z in the sequence layout; dt, dA_cumsum in the chunked one (dt 0 past seqlen, as the official
    chunk cumsum leaves it), prev_states, D; all leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    nchunks = -(-seqlen // Q)
    dt = F.pad(F.softplus(r(batch, seqlen, NHEADS)), (0, 0, 0, nchunks * Q - seqlen))
    dt = dt.unflatten(1, (nchunks, Q)).permute(0, 3, 1, 2)  # (batch, nheads, nchunks, Q)
    A = -torch.rand(NHEADS, generator=g, dtype=torch.float64) - 0.2
    t = dict(B=r(batch, seqlen, NGROUPS, DSTATE), C=r(batch, seqlen, NGROUPS, DSTATE),
             x=r(batch, seqlen, NHEADS, HEADDIM),
             z=r(batch, seqlen, NHEADS, HEADDIM), dt=dt, dA_cumsum=(dt * A[:, None, None]).cumsum(-1),
             prev_states=r(batch, nchunks, NHEADS, HEADDIM, DSTATE), D=r(NHEADS, HEADDIM))
    return {k: v.to(dtype).requires_grad_() for k, v in t.items()}


def chunk_loop(B, C, x, dt, dA_cumsum, prev_states, D=None, z=None):
    """float64, position by position through every chunk (zeros past seqlen): s = exp(dA_cumsum[l] -
    dA_cumsum[l - 1]) s + dt_l x_l B_l^T from s = prev_states[c]; y_l = s C_l (+ D x_l, * silu z_l). Returns (y,
    each chunk's last s)."""
    B, C, x, dt, dA, prev = (t.double() for t in (B, C, x, dt, dA_cumsum, prev_states))
    batch, seqlen, nheads, headdim = x.shape
    pad = dt.shape[2] * Q - seqlen
    Bh, Ch = (F.pad(t.repeat_interleave(nheads // t.shape[2], 2), (0, 0, 0, 0, 0, pad)) for t in (B, C))
    xp = F.pad(x, (0, 0, 0, 0, 0, pad))
    ys, lasts = [], []
    for c in range(dt.shape[2]):
        s = prev[:, c]
        for q in range(Q):
            t = c * Q + q
            step = dA[:, :, c, q] - (dA[:, :, c, q - 1] if q else 0)
            s = torch.exp(step)[..., None, None] * s + (dt[:, :, c, q, None] * xp[:, t])[..., None] * Bh[:, t, :, None]
            ys.append((s * Ch[:, t, :, None]).sum(-1))
        lasts.append(s)
    y = torch.stack(ys, 1)[:, :seqlen]
    if D is not None:
        y = y + x * D.double()
    if z is not None:
        y = y * F.silu(z.double())
    return y, torch.stack(lasts, 1)


def passing_loop(states, dA_chunk_cumsum, initial_states=None):
    """float64: the state entering each chunk and the final one."""
    s = torch.zeros_like(states[:, 0]).double() if initial_states is None else initial_states.double()
    out = []
    for c in range(states.shape[1]):
        out.append(s)
        s = torch.exp(dA_chunk_cumsum[:, :, c].double())[..., None] * s + states[:, c].double()
    return torch.stack(out, 1), s


def grads_close(got, want, inputs):
    """Gradients of a fixed random projection of both outputs, float64."""
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ga = torch.autograd.grad((got.double() * w).sum(), inputs, allow_unused=True, retain_graph=True)
    gb = torch.autograd.grad((want * w).sum(), inputs, allow_unused=True, retain_graph=True)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_chunk_state_is_each_chunk_from_zero():
    t = chunked_inputs(torch.float32)
    want = chunk_loop(t["B"], t["C"], t["x"], t["dt"], t["dA_cumsum"], torch.zeros_like(t["prev_states"]))[1]
    got = chunk_state(t["B"], t["x"], t["dt"], t["dA_cumsum"])
    assert got.shape == (BATCH, NCHUNKS, NHEADS, HEADDIM, DSTATE) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **TOL)
    torch.testing.assert_close(chunk_state_ref(t["B"], t["x"], t["dt"], t["dA_cumsum"]).double(), want, **TOL)
    half = {k: v.detach().bfloat16() for k, v in t.items()}
    low = chunk_state(half["B"], half["x"], half["dt"], half["dA_cumsum"], states_in_fp32=False)
    assert low.dtype == torch.bfloat16
    assert chunk_state_ref(half["B"], half["x"], half["dt"], half["dA_cumsum"]).dtype == torch.bfloat16
    t = chunked_inputs()
    args = [t[k] for k in ("B", "x", "dt", "dA_cumsum")]
    grads_close(chunk_state(*args), chunk_loop(t["B"], t["C"], t["x"], t["dt"], t["dA_cumsum"],
                                               torch.zeros_like(t["prev_states"]))[1], args)


@pytest.mark.parametrize("with_initial", [False, True])
def test_state_passing_matches_loop(with_initial):
    g = torch.Generator().manual_seed(1)
    states = torch.randn(BATCH, NCHUNKS, NHEADS, 7, generator=g, dtype=torch.float64).requires_grad_()
    dAc = (-torch.rand(BATCH, NHEADS, NCHUNKS, generator=g, dtype=torch.float64) * 2).requires_grad_()
    h0 = torch.randn(BATCH, NHEADS, 7, generator=g, dtype=torch.float64).requires_grad_() if with_initial else None
    want_out, want_final = passing_loop(states, dAc, h0)
    out, final = state_passing(states.float(), dAc.float(), None if h0 is None else h0.float())
    assert out.dtype == torch.float32 and final.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, **TOL)
    torch.testing.assert_close(final.double(), want_final, **TOL)
    out, final = state_passing_ref(states.bfloat16(), dAc.float())
    assert out.dtype == final.dtype == torch.bfloat16
    inputs = [states, dAc] + ([h0] if with_initial else [])
    for got, want in zip(state_passing(states, dAc, h0), (want_out, want_final)):
        grads_close(got, want, inputs)


@pytest.mark.parametrize("gate", [False, True])
def test_chunk_scan_matches_loop(gate):
    t = chunked_inputs(torch.float32, seed=2)
    z = t["z"] if gate else None
    keys = ("B", "C", "x", "dt", "dA_cumsum", "prev_states")
    want = chunk_loop(*(t[k] for k in keys), D=t["D"], z=z)[0]
    for fn in (chunk_scan, chunk_scan_ref):
        got = fn(*(t[k] for k in keys), D=t["D"], z=z)
        assert got.shape == t["x"].shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, **TOL)
    t = chunked_inputs(seed=3)
    z = t["z"] if gate else None
    args = [t[k] for k in keys]
    got = chunk_scan(*args, D=t["D"][:, 0], z=z)
    grads_close(got, chunk_loop(*args, D=t["D"][:, :1], z=z)[0], args + [t["D"]] + ([z] if gate else []))


def test_chunks_compose_to_the_recurrence():
    """chunk_state -> state_passing -> chunk_scan is the whole SSD (what the official mamba_chunk_scan does)."""
    t = chunked_inputs(torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    h0 = torch.randn(BATCH, NHEADS, HEADDIM, DSTATE, generator=g)
    states = chunk_state(t["B"], t["x"], t["dt"], t["dA_cumsum"])
    prev, final = state_passing(states.flatten(-2), t["dA_cumsum"][..., -1], h0.flatten(-2))
    out = chunk_scan(t["B"], t["C"], t["x"], t["dt"], t["dA_cumsum"], prev.unflatten(-1, (HEADDIM, DSTATE)))
    dt = t["dt"].permute(0, 2, 3, 1).flatten(1, 2)[:, :SEQLEN]  # back to (batch, seqlen, nheads)
    A = t["dA_cumsum"][:, :, 0, 0] / t["dt"][:, :, 0, 0]
    y, hs = ssd_loop(t["x"], dt, A[0], t["B"], t["C"], h0=h0)
    torch.testing.assert_close(out.double(), y, **TOL)
    torch.testing.assert_close(final.double().unflatten(-1, (HEADDIM, DSTATE)), hs[:, -1], **TOL)


def test_chunk_state_varlen_is_each_sequence_alone():
    seqlens = [5, 0, 3, 9, 1, 4]  # ends inside chunks, on a chunk bound, an empty one
    total = sum(seqlens)
    t = chunked_inputs(torch.float32, seed=6, seqlen=total, batch=1)
    seq_idx = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))[None]
    dt = t["dt"].permute(0, 2, 3, 1).flatten(1, 2)[:, :total]
    A = (t["dA_cumsum"][:, :, 0, 0] / t["dt"][:, :, 0, 0])[0]
    _, hs = ssd_loop(t["x"], dt, A, t["B"], t["C"], seq_idx=seq_idx)  # resets at each sequence start
    nchunks = t["dt"].shape[2]
    entering = torch.stack([torch.zeros_like(hs[0, 0])] + [hs[0, c * Q - 1] for c in range(1, nchunks)])
    cu = F.pad(torch.tensor(seqlens).cumsum(0), (1, 0))
    got = chunk_state_varlen(t["B"][0], t["x"][0], t["dt"][0], t["dA_cumsum"][0], cu, entering.float())
    want = torch.stack([hs[0, e - 1] if e > s else torch.zeros_like(hs[0, 0])
                        for s, e in zip(cu.tolist(), cu.tolist()[1:])])
    torch.testing.assert_close(got.double(), want, **TOL)
    with pytest.raises(MambaKitError, match="cu_seqlens"):
        chunk_state_varlen(t["B"][0], t["x"][0], t["dt"][0], t["dA_cumsum"][0], cu[:-1], entering.float())


def ssd_inputs(dtype=torch.float32, seed=7, seqlen=SEQLEN):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    A = (-torch.rand(NHEADS, generator=g) - 0.2).to(dtype).requires_grad_()
    return dict(x=r(BATCH, seqlen, NHEADS, HEADDIM), dt=r(BATCH, seqlen, NHEADS), A=A,
                B=r(BATCH, seqlen, NGROUPS, DSTATE), C=r(BATCH, seqlen, NGROUPS, DSTATE), D=r(NHEADS),
                z=r(BATCH, seqlen, NHEADS, HEADDIM), dt_bias=r(NHEADS))


@pytest.mark.parametrize("fn", [mamba_chunk_scan, ssd_chunk_scan_combined_ref])
def test_mamba_chunk_scan_matches_loop(fn):
    t = ssd_inputs()
    want = ssd_loop(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True)[0]
    got = fn(t["x"], t["dt"], t["A"], t["B"], t["C"], 5, D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **TOL)
    t = ssd_inputs(torch.float64)
    got = fn(t["x"], t["dt"], t["A"], t["B"], t["C"], 5, D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True)
    grads_close(got, ssd_loop(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True)[0],
                list(t.values()))


def test_ssd_selective_scan_per_head_and_per_channel():
    t = ssd_inputs(torch.float64, seed=8)
    limit = (0.05, 1.2)
    want = ssd_loop(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True, limit)[0]
    got = ssd_selective_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
                             dt_softplus=True, dt_limit=limit)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    grads_close(got, want, list(t.values()))
    # the per-channel forms of dt, A, D, dt_bias (each head's value repeated) give the same
    rep = lambda v: v[..., None].expand(*v.shape, HEADDIM)  # noqa: E731
    A_full = rep(t["A"])[..., None].expand(NHEADS, HEADDIM, DSTATE).flatten(0, 1)
    got = ssd_selective_scan(t["x"], rep(t["dt"]), A_full, t["B"], t["C"], D=rep(t["D"]), z=t["z"],
                             dt_bias=rep(t["dt_bias"]), dt_softplus=True)
    want = ssd_loop(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True)[0]
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    f32 = {k: v.detach().float() for k, v in t.items()}
    got = ssd_selective_scan(f32["x"], f32["dt"], f32["A"], f32["B"], f32["C"], D=f32["D"], dt_softplus=True)
    torch.testing.assert_close(got.double(), ssd_loop(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], None, None,
                                                      True)[0], **TOL)
    with pytest.raises(MambaKitError, match="dt must have shape"):
        ssd_selective_scan(f32["x"], f32["dt"][:, :3], f32["A"], f32["B"], f32["C"])


@pytest.mark.parametrize("gated", [False, True])
def test_mamba_conv1d_scan_ref_is_conv_then_scan(gated):
    g = torch.Generator().manual_seed(10)
    dim = NHEADS * HEADDIM
    channels = dim + 2 * NGROUPS * DSTATE
    xBC = torch.randn(BATCH, SEQLEN, channels, generator=g)
    w, b = torch.randn(channels, 4, generator=g) * 0.5, torch.randn(channels, generator=g)
    t = ssd_inputs(seed=11)
    z = t["z"].flatten(-2) if gated else None
    D = t["D"] if gated else t["D"][:, None].expand(NHEADS, HEADDIM)  # headdim from z, else from D's shape
    out = mamba_conv1d_scan_ref(xBC, w, b, t["dt"], t["A"], 64, D=D, z=z, dt_bias=t["dt_bias"], dt_softplus=True,
                                ngroups=NGROUPS)
    conv = conv_loop(xBC.transpose(1, 2), w, b, activation="silu").transpose(1, 2)
    x, B, C = torch.split(conv, [dim, NGROUPS * DSTATE, NGROUPS * DSTATE], -1)
    want = ssd_loop(x.unflatten(-1, (NHEADS, HEADDIM)), t["dt"], t["A"], B.unflatten(-1, (NGROUPS, DSTATE)),
                    C.unflatten(-1, (NGROUPS, DSTATE)), D, None if z is None else t["z"], t["dt_bias"], True)[0]
    torch.testing.assert_close(out.double(), want.flatten(-2), **TOL)
    with pytest.raises(MambaKitError, match="headdim"):
        mamba_conv1d_scan_ref(xBC, w, b, t["dt"], t["A"], 64, D=t["D"], ngroups=NGROUPS)


def test_chunked_layout_errors_name_the_argument():
    t = {k: v.detach() for k, v in chunked_inputs(torch.float32).items()}
    with pytest.raises(MambaKitError, match="dA_cumsum"):
        chunk_state(t["B"], t["x"], t["dt"], t["dA_cumsum"][..., :2])
    with pytest.raises(MambaKitError, match="cover seqlen"):
        chunk_state(t["B"], t["x"], t["dt"][:, :, :2], t["dA_cumsum"][:, :, :2])
    with pytest.raises(MambaKitError, match="prev_states"):
        chunk_scan(t["B"], t["C"], t["x"], t["dt"], t["dA_cumsum"], t["prev_states"][:, :1])
    with pytest.raises(MambaKitError, match="C must have"):
        chunk_scan(t["B"], t["C"][..., :2], t["x"], t["dt"], t["dA_cumsum"], t["prev_states"])
    with pytest.raises(MambaKitError, match="dA_chunk_cumsum"):
        state_passing(t["prev_states"].flatten(-2), t["dA_cumsum"])


@pytest.mark.parametrize("where", ["x", "B", "dt"])
def test_chunk_scan_keeps_non_finite_values_causal(where):
    """A NaN at position 5 (chunk 1 = positions 4..7) reaches positions 5..7 only, as in the recurrence."""
    t = {k: v.detach() for k, v in chunked_inputs(torch.float32, seed=12).items()}
    clean = chunk_scan(t["B"], t["C"], t["x"], t["dt"], t["dA_cumsum"], t["prev_states"], D=t["D"])
    if where == "dt":
        t["dt"][0, 0, 1, 1] = float("nan")  # head 0 only
    else:
        t[where][0, 5, 0] = float("nan")  # head 0 (x) or group 0, heads 0 and 1 (B)
    got = chunk_scan(t["B"], t["C"], t["x"], t["dt"], t["dA_cumsum"], t["prev_states"], D=t["D"])
    heads = [0, 1] if where == "B" else [0]
    assert got[0, 5:8, heads].isnan().all()
    keep = torch.ones_like(got, dtype=torch.bool)
    keep[0, 5:8, heads] = False
    torch.testing.assert_close(got[keep], clean[keep])


@pytest.mark.gpu
def test_cuda_mamba_chunk_scan_and_chunk_pieces():
    """On CUDA mamba_chunk_scan runs mambakit's Triton SSD kernels; the chunk pieces run in PyTorch on the device."""
    t = ssd_inputs(seqlen=200)
    want = ssd_loop(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True)[0]
    cuda = {k: v.detach().cuda().requires_grad_() for k, v in t.items()}
    got = mamba_chunk_scan(cuda["x"], cuda["dt"], cuda["A"], cuda["B"], cuda["C"], 64, D=cuda["D"], z=cuda["z"],
                           dt_bias=cuda["dt_bias"], dt_softplus=True)
    torch.testing.assert_close(got.double().cpu(), want, **TOL)
    got.sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in cuda.values())
    c = {k: v.detach().cuda() for k, v in chunked_inputs(torch.float32).items()}
    out = chunk_scan(c["B"], c["C"], c["x"], c["dt"], c["dA_cumsum"], c["prev_states"], D=c["D"], z=c["z"])
    want = chunk_loop(*(c[k].cpu() for k in ("B", "C", "x", "dt", "dA_cumsum", "prev_states")), D=c["D"].cpu(),
                      z=c["z"].cpu())[0]
    torch.testing.assert_close(out.double().cpu(), want, **TOL)
