"""mambakit.compat.mamba_ssm.ops.triton.ssd_combined against float64 loops written here: the varlen states of
packed sequences (cu_seqlens, return_varlen_states, state_dtype) and the fused Mamba-2 path
mamba_split_conv1d_scan_combined in its argument forms, outputs and gradients. Tolerances: float32 rtol 3e-4, atol
1e-3 (the official float32 ones); the varlen states also at the official bfloat16 ones (rtol 1e-2, atol 3e-3)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.compat.mamba_ssm.ops.triton.ssd_combined import (
    mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined, mamba_split_conv1d_scan_ref,
)
from mambakit.errors import MambaKitError
from tests.compat.causal_conv1d.test_causal_conv1d_interface import conv_loop

TOL = dict(rtol=3e-4, atol=1e-3)


def ssd_loop(x, dt, A, B, C, D=None, z=None, dt_bias=None, softplus=False, dt_limit=None, h0=None, seq_idx=None):
    """The Mamba-2 recurrence in float64, one position at a time: (y, states after every position)."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    batch, seqlen, nheads, headdim = x.shape
    reps = nheads // B.shape[2]
    dt = dt + (0 if dt_bias is None else dt_bias.double())
    dt = F.softplus(dt) if softplus else dt
    if dt_limit is not None:
        dt = dt.clamp(*dt_limit)
    h = h0.double() if h0 is not None else x.new_zeros(batch, nheads, headdim, B.shape[-1])
    ys, hs = [], []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None, None]
        Bt, Ct = B[:, t].repeat_interleave(reps, 1), C[:, t].repeat_interleave(reps, 1)  # (batch, nheads, dstate)
        h = h * torch.exp(dt[:, t] * A)[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
        y = (h * Ct[:, :, None]).sum(-1)
        if D is not None:
            y = y + x[:, t] * (D.double() if D.dim() == 2 else D.double()[:, None])
        if z is not None:
            y = y * F.silu(z[:, t].double())
        ys.append(y)
        hs.append(h)
    return torch.stack(ys, 1), torch.stack(hs, 1)


def varlen_inputs(seqlens, nheads=4, headdim=3, ngroups=2, dstate=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    total = sum(seqlens)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    x, dt = r(1, total, nheads, headdim), r(1, total, nheads)
    A = (-torch.rand(nheads, generator=g) - 0.2).requires_grad_()
    B, C = r(1, total, ngroups, dstate), r(1, total, ngroups, dstate)
    D, dt_bias, h0 = r(nheads), r(nheads), r(1, nheads, headdim, dstate)
    cu = F.pad(torch.tensor(seqlens).cumsum(0), (1, 0)).to(torch.int32)
    seq_idx = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))[None].to(torch.int32)
    return x, dt, A, B, C, D, dt_bias, h0, cu, seq_idx


def each_alone(x, dt, A, B, C, D, dt_bias, h0, cu, dt_limit):
    """float64: y and the final state of each sequence run alone (h0 only for the first)."""
    ys, finals = [], []
    for i, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        if e == s:  # an empty sequence keeps the state it starts from
            finals.append(h0[0].double() if i == 0 else torch.zeros_like(h0[0]).double())
            continue
        y, hs = ssd_loop(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D, None, dt_bias, True, dt_limit,
                         h0 if i == 0 else None)
        ys.append(y)
        finals.append(hs[0, -1])
    return torch.cat(ys, 1), torch.stack(finals)


@pytest.mark.parametrize("chunk_size", [4, 7])
def test_varlen_states_are_each_sequence_alone(chunk_size):
    x, dt, A, B, C, D, dt_bias, h0, cu, seq_idx = varlen_inputs([5, 1, 11, 8])
    limit = (0.0, 1.5)
    y, final, states = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=h0,
                                                 seq_idx=seq_idx, cu_seqlens=cu, dt_softplus=True, dt_limit=limit,
                                                 return_final_states=True, return_varlen_states=True)
    want_y, want_states = each_alone(x, dt, A, B, C, D, dt_bias, h0, cu, limit)
    assert states.shape == (4, 4, 3, 5) and states.dtype == torch.float32
    torch.testing.assert_close(y.double(), want_y, **TOL)
    torch.testing.assert_close(states.double(), want_states, **TOL)
    torch.testing.assert_close(final[0].double(), want_states[-1], **TOL)
    # differentiable (the official backward refuses varlen states)
    gs = torch.randn_like(want_states)
    params = (x, dt, A, B, D, dt_bias, h0)
    got = torch.autograd.grad((states.double() * gs).sum(), (x, dt, A, B, h0))
    p64 = [t.detach().double().requires_grad_() for t in params]
    want = torch.autograd.grad((each_alone(*p64[:4], C, *p64[4:], cu, limit)[1] * gs).sum(),
                               (p64[0], p64[1], p64[2], p64[3], p64[6]))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **TOL)


def test_varlen_only_and_state_dtype_and_empty_sequence():
    x, dt, A, B, C, D, dt_bias, h0, cu, seq_idx = varlen_inputs([3, 0, 6], seed=1)
    y, states = mamba_chunk_scan_combined(x, dt, A, B, C, 4, D=D, dt_bias=dt_bias, seq_idx=seq_idx, cu_seqlens=cu,
                                          dt_softplus=True, return_varlen_states=True, state_dtype=torch.bfloat16)
    _, want = each_alone(x, dt, A, B, C, D, dt_bias, torch.zeros_like(h0), cu, None)
    assert states.dtype == torch.bfloat16 and bool((states[1] == 0).all())
    torch.testing.assert_close(states.double(), want, rtol=1e-2, atol=3e-3)
    out, final = mamba_chunk_scan_combined(x, dt, A, B, C, 4, cu_seqlens=cu, return_final_states=True,
                                           state_dtype=torch.float16)  # cu_seqlens ignored without varlen states
    assert final.dtype == torch.float16 and out.shape == x.shape


def test_varlen_bfloat16_inputs():
    x, dt, A, B, C, D, dt_bias, h0, cu, seq_idx = varlen_inputs([9, 4, 13], seed=2, dtype=torch.bfloat16)
    _, states = mamba_chunk_scan_combined(x, dt, A, B, C, 8, D=D, dt_bias=dt_bias, initial_states=h0,
                                          seq_idx=seq_idx, cu_seqlens=cu, dt_softplus=True,
                                          return_varlen_states=True)
    _, want = each_alone(x, dt, A, B, C, D, dt_bias, h0, cu, None)
    assert states.dtype == torch.float32
    torch.testing.assert_close(states.double(), want, rtol=1e-2, atol=3e-3)


def test_varlen_errors_name_the_argument():
    x, dt, A, B, C, D, dt_bias, h0, cu, seq_idx = varlen_inputs([3, 4])
    with pytest.raises(MambaKitError, match="cu_seqlens"):
        mamba_chunk_scan_combined(x, dt, A, B, C, 4, return_varlen_states=True)
    with pytest.raises(MambaKitError, match="cu_seqlens"):
        mamba_chunk_scan_combined(x, dt, A, B, C, 4, cu_seqlens=torch.tensor([0, 5, 6]), return_varlen_states=True)
    with pytest.raises(MambaKitError, match="batch 1"):
        two = lambda t: t.detach().expand(2, *t.shape[1:])  # noqa: E731
        mamba_chunk_scan_combined(two(x), two(dt), A, two(B), two(C), 4, cu_seqlens=cu, return_varlen_states=True)


def split_inputs(d_mlp=0, ngroups=2, nheads=4, headdim=3, dstate=4, width=4, batch=2, seqlen=11, seed=0,
                 out_dim=5):
    g = torch.Generator().manual_seed(seed)
    dim = nheads * headdim
    conv_dim = dim + 2 * ngroups * dstate
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).requires_grad_()  # noqa: E731
    return dict(
        zxbcdt=r(batch, seqlen, 2 * d_mlp + dim + conv_dim + nheads), conv1d_weight=r(conv_dim, width, scale=0.5),
        conv1d_bias=r(conv_dim), dt_bias=r(nheads), A=(-torch.rand(nheads, generator=g) - 0.2).requires_grad_(),
        D=r(nheads, headdim), rmsnorm_weight=r(dim), outproj_weight=r(out_dim, d_mlp + dim, scale=0.3),
        outproj_bias=r(out_dim)), dict(nheads=nheads, headdim=headdim, dim=dim, dstate=dstate, d_mlp=d_mlp,
                                       ngroups=ngroups)


def split_ref64(p, sizes, chunk_size=None, initial_states=None, seq_idx=None, dt_limit=None, rms=True,
                norm_before_gate=True, outproj=True, D_1d=False, eps=1e-6):
    """The fused path written out in float64 from the loops here: (out, final_state); differentiable in p's
    float64 tensors."""
    f = {k: v if v.dtype == torch.float64 else v.detach().double() for k, v in p.items()}
    nheads, headdim, dim, dstate, d_mlp, ngroups = (sizes[k] for k in
                                                     ("nheads", "headdim", "dim", "dstate", "d_mlp", "ngroups"))
    z0, x0, z, xBC, dt = torch.split(f["zxbcdt"], [d_mlp, d_mlp, dim, dim + 2 * ngroups * dstate, nheads], -1)
    xBC = conv_loop(xBC.transpose(1, 2), f["conv1d_weight"], f["conv1d_bias"], seq_idx=seq_idx,
                    activation="silu").transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], -1)
    zh = z.unflatten(-1, (nheads, headdim))
    D = f["D"][:, 0] if D_1d else f["D"]
    y, hs = ssd_loop(x.unflatten(-1, (nheads, headdim)), dt, f["A"], B.unflatten(-1, (ngroups, dstate)),
                     C.unflatten(-1, (ngroups, dstate)), D, None if rms else zh, f["dt_bias"], True, dt_limit,
                     initial_states, seq_idx)
    out = y.flatten(-2)
    if rms:
        gate = F.silu(z)
        h = out if norm_before_gate else out * gate
        groups = h.unflatten(-1, (ngroups, -1))
        h = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * f["rmsnorm_weight"]
        out = h * gate if norm_before_gate else h
    if d_mlp:
        out = torch.cat([F.silu(z0) * x0, out], -1)
    if outproj:
        out = out @ f["outproj_weight"].T + f["outproj_bias"]
    return out, hs[:, -1]


@pytest.mark.parametrize("d_mlp,ngroups,rms,norm_before_gate,outproj,D_1d", [
    (0, 1, True, True, True, False),
    (0, 2, True, False, True, True),
    (3, 2, True, True, True, False),
    (0, 2, False, True, False, False),
    (2, 4, False, True, True, True),
])
def test_split_conv1d_scan_matches_float64(d_mlp, ngroups, rms, norm_before_gate, outproj, D_1d):
    p, sizes = split_inputs(d_mlp, ngroups, seed=d_mlp * 7 + ngroups)
    if not outproj:
        p["outproj_weight"] = torch.randn(sizes["d_mlp"] + sizes["dim"], sizes["d_mlp"] + sizes["dim"])
    D = p["D"][:, 0] if D_1d else p["D"]
    kw = dict(rmsnorm_weight=p["rmsnorm_weight"] if rms else None, outproj_weight=p["outproj_weight"] if outproj
              else None, outproj_bias=p["outproj_bias"] if outproj else None, headdim=sizes["headdim"] if D_1d
              else None, ngroups=ngroups, norm_before_gate=norm_before_gate)
    out = mamba_split_conv1d_scan_combined(p["zxbcdt"], p["conv1d_weight"], p["conv1d_bias"], p["dt_bias"], p["A"],
                                           D, 4, **kw)
    want, _ = split_ref64(p, sizes, rms=rms, norm_before_gate=norm_before_gate, outproj=outproj, D_1d=D_1d)
    torch.testing.assert_close(out.double(), want, **TOL)
    ref = mamba_split_conv1d_scan_ref(p["zxbcdt"], p["conv1d_weight"], p["conv1d_bias"], p["dt_bias"], p["A"], D, 4,
                                      **kw)
    torch.testing.assert_close(ref.double(), want, **TOL)
    names = ["zxbcdt", "conv1d_weight", "conv1d_bias", "dt_bias", "A", "D"] + (["rmsnorm_weight"] if rms else []) + (
        ["outproj_weight"] if outproj else [])
    g = torch.randn_like(want)
    got = torch.autograd.grad((out.double() * g).sum(), [p[n] for n in names])
    p64 = {k: v.detach().double().requires_grad_() for k, v in p.items()}
    want_out, _ = split_ref64(p64, sizes, rms=rms, norm_before_gate=norm_before_gate, outproj=outproj, D_1d=D_1d)
    want_g = torch.autograd.grad((want_out * g).sum(), [p64[n] for n in names])
    for name, a, b in zip(names, got, want_g):
        torch.testing.assert_close(a.double(), b, **TOL, msg=name)


def test_split_conv1d_scan_with_states_seq_idx_and_dt_limit():
    p, sizes = split_inputs(seed=5)
    seq_idx = torch.tensor([[0] * 6 + [1] * 5, [2] * 11], dtype=torch.int32)
    h0 = torch.randn(2, 4, 3, 4, requires_grad=True)
    out, final = mamba_split_conv1d_scan_combined(
        p["zxbcdt"], p["conv1d_weight"], p["conv1d_bias"], p["dt_bias"], p["A"], p["D"], 5, initial_states=h0,
        seq_idx=seq_idx, dt_limit=(0.05, 2.0), return_final_states=True, rmsnorm_weight=p["rmsnorm_weight"],
        outproj_weight=p["outproj_weight"], outproj_bias=p["outproj_bias"], ngroups=2, state_dtype=torch.bfloat16)
    want, want_final = split_ref64(p, sizes, initial_states=h0.detach().double(), seq_idx=seq_idx,
                                   dt_limit=(0.05, 2.0))
    torch.testing.assert_close(out.double(), want, **TOL)
    assert final.dtype == torch.bfloat16
    torch.testing.assert_close(final.double(), want_final, rtol=1e-2, atol=3e-3)
    g = torch.randn_like(want)
    got = torch.autograd.grad((out.double() * g).sum(), (h0, p["zxbcdt"]))
    p64 = {k: v.detach().double().requires_grad_() for k, v in p.items()}
    h64 = h0.detach().double().requires_grad_()
    want_out, _ = split_ref64(p64, sizes, initial_states=h64, seq_idx=seq_idx, dt_limit=(0.05, 2.0))
    for a, b in zip(got, torch.autograd.grad((want_out * g).sum(), (h64, p64["zxbcdt"]))):
        torch.testing.assert_close(a.double(), b, **TOL)


def test_split_conv1d_scan_errors_name_the_argument():
    p, sizes = split_inputs()
    args = (p["zxbcdt"], p["conv1d_weight"], p["conv1d_bias"], p["dt_bias"], p["A"])
    with pytest.raises(MambaKitError, match="headdim"):
        mamba_split_conv1d_scan_combined(*args, p["D"][:, 0], 4, ngroups=2)
    with pytest.raises(MambaKitError, match="zxbcdt"):
        mamba_split_conv1d_scan_combined(p["zxbcdt"][..., :-1], *args[1:], p["D"], 4, ngroups=2)
    with pytest.raises(MambaKitError, match="conv1d_weight"):
        mamba_split_conv1d_scan_combined(p["zxbcdt"], p["conv1d_weight"][:-1], *args[2:], p["D"], 4, ngroups=2)
    with pytest.raises(MambaKitError, match="activation"):
        mamba_split_conv1d_scan_combined(*args, p["D"], 4, ngroups=2, activation="relu")
    with pytest.raises(MambaKitError, match="outproj_bias"):
        mamba_split_conv1d_scan_combined(*args, p["D"], 4, ngroups=2, outproj_bias=p["outproj_bias"])


@pytest.mark.gpu
def test_cuda_split_conv1d_scan_and_varlen_states():
    p, sizes = split_inputs(d_mlp=2, seed=11, seqlen=40)
    seq_idx = torch.tensor([[0] * 25 + [1] * 15, [3] * 40], dtype=torch.int32)
    cuda = {k: v.detach().cuda().requires_grad_() for k, v in p.items()}
    out, final = mamba_split_conv1d_scan_combined(
        cuda["zxbcdt"], cuda["conv1d_weight"], cuda["conv1d_bias"], cuda["dt_bias"], cuda["A"], cuda["D"], 16,
        seq_idx=seq_idx.cuda(), return_final_states=True, rmsnorm_weight=cuda["rmsnorm_weight"],
        outproj_weight=cuda["outproj_weight"], outproj_bias=cuda["outproj_bias"], ngroups=2)
    want, want_final = split_ref64(p, sizes, seq_idx=seq_idx)
    torch.testing.assert_close(out.double().cpu(), want, **TOL)
    torch.testing.assert_close(final.double().cpu(), want_final, **TOL)
    out.sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in cuda.values() if v.grad is not None)
    x, dt, A, B, C, D, dt_bias, h0, cu, seq_idx = varlen_inputs([30, 3, 50])
    to = lambda t: t.detach().cuda()  # noqa: E731
    _, states = mamba_chunk_scan_combined(to(x), to(dt), to(A), to(B), to(C), 16, D=to(D), dt_bias=to(dt_bias),
                                          initial_states=to(h0), seq_idx=to(seq_idx), cu_seqlens=to(cu),
                                          dt_softplus=True, return_varlen_states=True)
    _, want_states = each_alone(x, dt, A, B, C, D, dt_bias, h0, cu, None)
    torch.testing.assert_close(states.double().cpu(), want_states, **TOL)
