"""The chunked selective scan against the sequential reference: outputs, final states, gradients."""
from __future__ import annotations

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.ops.selective_scan import (
    selective_scan_chunked,
    selective_scan_fn,
    selective_scan_ref,
    selective_state_update,
)
from tests.conftest import rel_err


def make_inputs(batch, dim, d_state, seqlen, groups=0, dtype=torch.float64, with_D=True, with_z=True, with_bias=True,
                with_h0=False, packed=False, delta_scale=0.5, seed=0):
    """groups=0: B, C (batch, d_state, seqlen); groups>=1: grouped layout."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).requires_grad_()

    bc_shape = (batch, d_state, seqlen) if groups == 0 else (batch, groups, d_state, seqlen)
    kw = dict(
        u=r(batch, dim, seqlen), delta=r(batch, dim, seqlen, scale=delta_scale, shift=-1.0),
        A=(-torch.rand(dim, d_state, generator=g, dtype=torch.float64) * 4 - 0.1).to(dtype).requires_grad_(),
        B=r(*bc_shape), C=r(*bc_shape),
        D=r(dim) if with_D else None, z=r(batch, dim, seqlen) if with_z else None,
        delta_bias=r(dim, scale=0.3) if with_bias else None, delta_softplus=True,
        initial_state=r(batch, dim, d_state) if with_h0 else None,
    )
    if packed:
        idx = torch.zeros(batch, seqlen, dtype=torch.int32)
        for b in range(batch):
            cuts = sorted(torch.randint(1, max(seqlen, 2), (3,), generator=g).tolist())
            for c in cuts:
                idx[b, c:] += 1
        kw["seq_idx"] = idx
    return kw


def grads(fn, kw, chunk=None):
    extra = {"chunk_size": chunk} if chunk else {}
    y, last = fn(**kw, return_last_state=True, **extra)
    g = torch.Generator().manual_seed(123)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    gr = torch.autograd.grad((y * gy).sum() + (last * gs).sum(), [kw[n] for n in names])
    return y, last, dict(zip(names, gr))


SHAPES = [
    # batch, dim, d_state, seqlen, groups, chunk
    (2, 4, 3, 1, 0, 8),
    (1, 6, 1, 13, 0, 4),
    (2, 6, 4, 37, 3, 8),
    (3, 8, 5, 64, 2, 16),
    (1, 3, 2, 101, 1, 32),
    (2, 4, 16, 129, 0, 64),
]


@pytest.mark.parametrize("batch,dim,d_state,seqlen,groups,chunk", SHAPES)
@pytest.mark.parametrize("options", [dict(), dict(with_h0=True), dict(packed=True, with_h0=True),
                                     dict(with_D=False, with_z=False, with_bias=False)])
def test_chunked_matches_reference_fp64(batch, dim, d_state, seqlen, groups, chunk, options):
    kw = make_inputs(batch, dim, d_state, seqlen, groups, seed=seqlen * 7 + dim, **options)
    y_ref, s_ref, g_ref = grads(selective_scan_ref, kw)
    y, s, g = grads(selective_scan_chunked, kw, chunk)
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(s, s_ref) < 1e-12
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < 1e-10, name


def test_chunked_fp32_close_to_fp64_reference():
    kw64 = make_inputs(2, 16, 8, 300, 2, with_h0=True, seed=5)
    kw32 = {k: (v.detach().float().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in kw64.items()}
    y_ref, s_ref, g_ref = grads(selective_scan_ref, kw64)
    y, s, g = grads(selective_scan_chunked, kw32)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < 1e-4, name


def test_bf16_inputs_are_computed_in_fp32():
    kw = make_inputs(2, 8, 4, 200, 0, dtype=torch.bfloat16, seed=3)
    ref_kw = {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in kw.items()}
    y = selective_scan_chunked(**kw)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, selective_scan_ref(**ref_kw)) < 1e-2


def test_long_sequence_with_large_decays_stays_finite():
    # delta*A sums over a chunk far beyond exp's range: decays underflow to zero, nothing overflows
    kw = make_inputs(1, 4, 4, 3000, 0, dtype=torch.float32, delta_scale=3.0, seed=11)
    with torch.no_grad():
        kw["A"].mul_(5.0)
    ref_kw = {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in kw.items()}
    y, last = selective_scan_chunked(**kw, return_last_state=True)
    y_ref, last_ref = selective_scan_ref(**ref_kw, return_last_state=True)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(last, last_ref) < 1e-5
    y.sum().backward()
    assert all(torch.isfinite(kw[n].grad).all() for n in ("u", "delta", "A", "B", "C"))


def test_huge_single_step_decay_is_exact():
    kw = make_inputs(1, 2, 2, 20, 0, seed=2)
    with torch.no_grad():
        kw["delta"][0, 0, 5] = 400.0  # softplus ~ 400, times |A| >= 0.1: a decay of e^-40 or far less in one step
        kw["A"].mul_(10.0)
    y = selective_scan_chunked(**kw)
    assert rel_err(y, selective_scan_ref(**kw)) < 1e-12


def test_packed_sequences_equal_each_sequence_alone():
    torch.manual_seed(0)
    dim, d_state, lengths = 6, 4, [7, 30, 1, 22]
    kw = make_inputs(1, dim, d_state, sum(lengths), 0, with_h0=False, seed=9)
    kw["seq_idx"] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(torch.int32)
    y, last = selective_scan_chunked(**kw, return_last_state=True, chunk_size=8)
    start = 0
    for n in lengths:
        part = {k: (v[..., start:start + n] if k in ("u", "delta", "B", "C", "z") else v)
                for k, v in kw.items() if k != "seq_idx"}
        y_alone, last_alone = selective_scan_ref(**part, return_last_state=True)
        assert rel_err(y[..., start:start + n], y_alone) < 1e-12
        start += n
    assert rel_err(last, last_alone) < 1e-12


def test_gradcheck_fast_path():
    kw = make_inputs(1, 2, 2, 9, 0, with_h0=True, packed=True, seed=4)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]

    def f(*tensors):
        args = dict(kw, **dict(zip(names, tensors)))
        y, last = selective_scan_chunked(**args, return_last_state=True, chunk_size=4)
        return y, last

    assert torch.autograd.gradcheck(f, [kw[n] for n in names])


def test_gradcheck_reference():
    kw = make_inputs(1, 2, 2, 5, 0, with_h0=True, seed=6)
    names = ["u", "delta", "A", "B", "C", "initial_state"]

    def f(*tensors):
        return selective_scan_ref(**dict(kw, **dict(zip(names, tensors))), return_last_state=True)

    assert torch.autograd.gradcheck(f, [kw[n] for n in names])


def test_state_update_steps_equal_scan():
    kw = make_inputs(2, 6, 4, 12, 2, with_h0=True, seed=8)
    kw = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    y_ref, last_ref = selective_scan_ref(**kw, return_last_state=True)
    state = kw["initial_state"].clone()
    ys = []
    for t in range(12):
        ys.append(selective_state_update(state, kw["u"][..., t], kw["delta"][..., t], kw["A"], kw["B"][..., t],
                                         kw["C"][..., t], kw["D"], kw["z"][..., t], kw["delta_bias"], True))
    assert rel_err(torch.stack(ys, -1), y_ref) < 1e-12
    assert rel_err(state, last_ref) < 1e-12


def test_dispatch_backends_agree():
    kw = make_inputs(1, 4, 3, 20, 0, seed=1)
    y_t = selective_scan_fn(**kw, backend="torch")
    y_r = selective_scan_fn(**kw, backend="ref")
    assert rel_err(y_t, y_r) < 1e-12
    with pytest.raises(MambaKitError, match="backend"):
        selective_scan_fn(**kw, backend="cuda-magic")


@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_chunked])
def test_bad_inputs_name_the_argument(fn):
    kw = make_inputs(2, 4, 3, 10, 0, seed=1)
    bad = [
        ("delta", kw["delta"][..., :9], "delta"),
        ("A", kw["A"][:3], "A must have shape"),
        ("B", kw["B"][:, :2], "B must have shape"),
        ("C", torch.randn(2, 3, 3, 10, dtype=torch.float64), "C must have shape"),
        ("D", torch.randn(5, dtype=torch.float64), "D must have shape"),
        ("z", kw["z"][:1], "z must have shape"),
        ("initial_state", torch.randn(2, 4, 2, dtype=torch.float64), "initial_state"),
    ]
    for name, value, msg in bad:
        with pytest.raises(MambaKitError, match=msg):
            fn(**dict(kw, **{name: value}))
    with pytest.raises(MambaKitError, match="seq_idx must be an integer"):
        fn(**kw, seq_idx=torch.zeros(2, 10))


def _step64(state, x, dt, A, B, C, D, z, dt_bias):
    """Mamba-1 layout, float64, dt_softplus: (y, new_state); B, C (batch, groups, d_state)."""
    state, x, z = state.double(), x.double(), z.double()
    dt = torch.nn.functional.softplus(dt.double() + dt_bias.double())
    reps = state.shape[1] // B.shape[1]
    Bd, Cd = (t.double().repeat_interleave(reps, 1) for t in (B, C))
    new = state * torch.exp(dt[..., None] * A.double()) + (dt * x)[..., None] * Bd
    y = ((new * Cd).sum(-1) + x * D.double()) * torch.nn.functional.silu(z)
    return y, new


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_state_update_half_state_is_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(9)
    batch, dim, d_state, groups = 3, 6, 5, 2
    state = torch.randn(batch, dim, d_state, generator=g).to(dtype)
    x, dt, z = (torch.randn(batch, dim, generator=g).to(dtype) for _ in range(3))
    A = -torch.rand(dim, d_state, generator=g) - 0.5
    B, C = (torch.randn(batch, groups, d_state, generator=g).to(dtype) for _ in range(2))
    D, dt_bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    want_y, want_state = _step64(state, x, dt, A, B, C, D, z, dt_bias)
    y = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True)
    assert y.dtype == dtype and state.dtype == dtype
    # one rounding at the end: the stored state is the float64 value rounded (to float32 error)
    assert rel_err(state, want_state.to(dtype)) < 1e-6
    assert rel_err(y, want_y) <= torch.finfo(dtype).eps


def test_state_update_heads_layout_equals_ssd_step():
    from mambakit.ops.ssd import ssd_step

    g = torch.Generator().manual_seed(10)
    batch, nheads, headdim, d_state, ngroups = 2, 4, 3, 5, 2
    state = torch.randn(batch, nheads, headdim, d_state, generator=g, dtype=torch.float64)
    x, z = (torch.randn(batch, nheads, headdim, generator=g, dtype=torch.float64) for _ in range(2))
    dt = torch.randn(batch, nheads, generator=g, dtype=torch.float64)
    A = -torch.rand(nheads, generator=g, dtype=torch.float64) - 0.5
    B, C = (torch.randn(batch, ngroups, d_state, generator=g, dtype=torch.float64) for _ in range(2))
    D, dt_bias = (torch.randn(nheads, generator=g, dtype=torch.float64) for _ in range(2))
    ref_state = state.clone()
    want = ssd_step(ref_state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    per_head = lambda t: t[..., None].expand(*t.shape, headdim)  # noqa: E731  (the official stride-0 broadcast)
    y = selective_state_update(state, x, per_head(dt), A[:, None, None].expand(-1, headdim, d_state), B, C,
                               per_head(D), z, per_head(dt_bias), True)
    assert rel_err(y, want) < 1e-14 and rel_err(state, ref_state) < 1e-14
    pool = torch.zeros(3, nheads, headdim, d_state, dtype=torch.float64)
    pool[2], pool[0] = state[0], state[1]
    y2 = selective_state_update(pool, x, per_head(dt), A[:, None, None].expand(-1, headdim, d_state), B, C,
                                per_head(D), z, per_head(dt_bias), True, state_batch_indices=torch.tensor([2, -1]))
    assert bool((y2[1] == 0).all()) and torch.equal(pool[0], state[1])
    with pytest.raises(MambaKitError, match="state_batch_indices"):
        selective_state_update(pool, x, per_head(dt), A[:, None, None].expand(-1, headdim, d_state), B, C,
                               state_batch_indices=torch.zeros(3, dtype=torch.long))
