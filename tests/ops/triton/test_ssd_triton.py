"""The Triton SSD kernels against the float64 recurrence, run on the CPU through the Triton interpreter.

Every awkward case of tests/ops/test_ssd.py (ragged lengths, packed sequences, groups, d_state 1, ...), forward,
final state and every gradient in float32 (rel err <= 1e-5); several chunks; half-precision inputs; strided inputs;
bit-identical gradients run after run; dispatch and errors.
"""
from __future__ import annotations

import sys

import pytest

pytest.importorskip("triton")

import torch

from mambakit.errors import MambaKitError
from mambakit.ops.ssd import mamba_chunk_scan_combined, ssd_recurrent
from tests.conftest import rel_err
from tests.ops.test_ssd import CASES, FLOAT_KEYS, make_inputs, with_dtype
from tests.ops.triton import interpreted_module

interpreted_module("mambakit.ops.ssd.triton")
interpreted_module("mambakit.ops.triton.state_update")


def _grad_keys(kw):
    return [k for k in FLOAT_KEYS if k in kw]


def _run(fn, kw, gy, gf, **extra):
    y, final = fn(**kw, **extra)
    loss = (y.double() * gy).sum() + (final.double() * gf).sum()
    keys = _grad_keys(kw)
    grads = torch.autograd.grad(loss, [kw[k] for k in keys])
    return y, final, dict(zip(keys, grads))


def _compare(kw64, dtype=torch.float32, tol=1e-5, **extra):
    ref = with_dtype(kw64, torch.float64, requires_grad=True)
    fast = with_dtype(kw64, dtype, requires_grad=True)
    y_shape = kw64["x"].shape
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(y_shape, generator=g, dtype=torch.float64)
    gf = torch.randn(y_shape[0], y_shape[2], y_shape[3], kw64["B"].shape[-1], generator=g, dtype=torch.float64)
    yr, fr, gr = _run(ssd_recurrent, ref, gy, gf)
    y, f, gt = _run(mamba_chunk_scan_combined, fast, gy, gf, backend="triton", **extra)
    assert y.dtype == dtype and f.dtype == torch.float32
    errors = {"y": rel_err(y, yr), "final": rel_err(f, fr)}
    errors.update({f"d{k}": rel_err(gt[k], gr[k]) for k in gr})
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_recurrence(name):
    _compare(make_inputs(**CASES[name]))


def test_many_chunks_long_sequence():
    # 300 positions in chunks of 16: 19 chunks, state passing over all of them, a ragged tail
    _compare(make_inputs(batch=1, seqlen=300, nheads=2, headdim=5, ngroups=1, d_state=3, chunk_size=16,
                         D="head", z=True, dt_softplus=True, dt_bias=True, initial_states=True))


def test_large_tiles_headdim_and_state():
    # headdim 40 and d_state 33 are padded to 64-wide tiles; d_state > 128 picks 32-position chunks
    _compare(make_inputs(batch=1, seqlen=40, nheads=2, headdim=40, ngroups=1, d_state=33, chunk_size=64,
                         dt_softplus=True, initial_states=True))
    _compare(make_inputs(batch=1, seqlen=35, nheads=1, headdim=4, ngroups=1, d_state=130, chunk_size=256,
                         dt_softplus=True))


# bfloat16 is checked on the GPU only (benchmarks/gpu_check_ssd.py): the Triton interpreter's tl.dot returns garbage
# for bfloat16 operands (a 16x16 bf16 product is off by ~1e10 there; float16 is exact).
@pytest.mark.parametrize("dtype", [torch.float16])
def test_half_precision_inputs(dtype):
    _compare(make_inputs(seqlen=45, nheads=4, headdim=8, ngroups=2, d_state=16, chunk_size=16, D="head", z=True,
                         dt_softplus=True, initial_states=True), dtype=dtype, tol=1e-2)


def test_tf32_products_forward_and_backward():
    # allow_tf32 reaches every kernel of the forward and the backward (on the GPU: 10-bit products, float32 sums;
    # the interpreter multiplies exactly, so this checks the plumbing, at tf32's tolerance)
    _compare(make_inputs(seqlen=45, nheads=4, headdim=8, ngroups=2, d_state=16, chunk_size=16, D="head", z=True,
                         dt_softplus=True, initial_states=True), tol=5e-3, allow_tf32=True)


def test_strided_inputs_from_one_projection():
    # as in the Mamba-2 block: x, B, C and dt are views into one packed projection
    kw = make_inputs(seqlen=21, nheads=4, headdim=3, ngroups=2, d_state=5, chunk_size=16, dt_softplus=True,
                     dtype=torch.float32)
    b, L = kw["x"].shape[:2]
    packed = torch.cat([kw["x"].reshape(b, L, -1), kw["B"].reshape(b, L, -1), kw["C"].reshape(b, L, -1),
                        kw["dt"]], dim=-1)
    cut = [12, 10, 10, 4]
    x, B, C, dt = torch.split(packed, cut, dim=-1)
    views = dict(kw, x=x.reshape(b, L, 4, 3), B=B.reshape(b, L, 2, 5), C=C.reshape(b, L, 2, 5), dt=dt)
    assert not views["x"].is_contiguous()
    y = mamba_chunk_scan_combined(**views, backend="triton")[0]
    yr = mamba_chunk_scan_combined(**kw, backend="torch")[0]
    assert rel_err(y, yr) <= 1e-5


def test_backward_is_deterministic():
    kw = with_dtype(make_inputs(batch=2, seqlen=50, nheads=4, headdim=8, ngroups=1, d_state=8, chunk_size=16,
                                dt_softplus=True, initial_states=True), torch.float32, requires_grad=True)
    gy = torch.randn(kw["x"].shape)
    runs = []
    for _ in range(2):
        y, _ = mamba_chunk_scan_combined(**kw, backend="triton")
        runs.append(torch.autograd.grad((y * gy).sum(), [kw[k] for k in _grad_keys(kw)]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_dispatch_and_errors():
    kw = make_inputs(seqlen=9, chunk_size=16, dtype=torch.float32)
    auto = mamba_chunk_scan_combined(**kw)[0]  # CPU tensors: the PyTorch path
    assert rel_err(auto, mamba_chunk_scan_combined(**kw, backend="torch")[0]) == 0.0
    with pytest.raises(MambaKitError, match="backend"):
        mamba_chunk_scan_combined(**kw, backend="cuda")
    with pytest.raises(MambaKitError, match="allow_tf32 must be a bool, got 'yes'"):
        mamba_chunk_scan_combined(**kw, allow_tf32="yes")
    with pytest.raises(MambaKitError, match="float64"):
        mamba_chunk_scan_combined(**make_inputs(seqlen=9, chunk_size=16), backend="triton")
    bad = dict(kw, B=kw["B"][:, :, :1].repeat(1, 1, 3, 1))  # 3 groups do not divide 4 heads
    with pytest.raises(MambaKitError, match="ngroups"):
        mamba_chunk_scan_combined(**bad, backend="triton")


@pytest.mark.parametrize("D_kind", [None, "head", "headdim"])
def test_decode_step_kernel_matches_torch(D_kind):
    from mambakit.ops.ssd import ssd_step

    g = torch.Generator().manual_seed(3)
    batch, nheads, headdim, ngroups, d_state = 2, 6, 3, 3, 5
    state = torch.randn(batch, nheads, headdim, d_state, generator=g)
    x, z = torch.randn(2, batch, nheads, headdim, generator=g)
    dt = torch.randn(batch, nheads, generator=g)
    A = -torch.rand(nheads, generator=g) - 0.1
    B, C = torch.randn(2, batch, ngroups, d_state, generator=g)
    D = {None: None, "head": torch.randn(nheads, generator=g),
         "headdim": torch.randn(nheads, headdim, generator=g)}[D_kind]
    bias = torch.randn(nheads, generator=g)
    s_ref, s_tri = state.clone(), state.clone()
    for _ in range(3):  # a few steps: the in-place state carries over
        kw = dict(D=D, z=z, dt_bias=bias, dt_softplus=True)
        y_ref = ssd_step(s_ref, x, dt, A, B, C, backend="torch", **kw)
        y_tri = ssd_step(s_tri, x, dt, A, B, C, backend="triton", **kw)
        assert rel_err(y_tri, y_ref) <= 1e-6 and rel_err(s_tri, s_ref) <= 1e-6
    with pytest.raises(MambaKitError, match="dt_limit"):
        ssd_step(s_tri, x, dt, A, B, C, dt_limit=(0.0, 1.0), backend="triton")


BLOCKED_CASES = ["everything", "packed", "packed-unsorted-ids", "groups3-dhead", "batch1-heads-per-group",
                 "chunk-gt-seqlen", "prime-ragged"]


@pytest.mark.parametrize("name", BLOCKED_CASES)
def test_chunks_of_several_blocks(name, monkeypatch):
    # 64-position chunks computed as 4 blocks of 16 (the tiled intra-chunk loops, the cumsum carried across blocks,
    # blocks wholly past the sequence end)
    ssd_mod = sys.modules["mambakit.ops.ssd.triton"]
    monkeypatch.setattr(ssd_mod, "MAX_BLOCK", 16)
    monkeypatch.setattr(ssd_mod, "MAX_CHUNK_FP32", 64)
    _compare(make_inputs(**dict(CASES[name], chunk_size=64)))


def test_several_blocks_long_sequence(monkeypatch):
    # 300 positions: 5 chunks of 2 blocks of 32 (float16: 32-position blocks), state passing, ragged tail
    ssd_mod = sys.modules["mambakit.ops.ssd.triton"]
    monkeypatch.setattr(ssd_mod, "MAX_BLOCK", 32)
    monkeypatch.setattr(ssd_mod, "MAX_CHUNK", 64)
    monkeypatch.setattr(ssd_mod, "MAX_CHUNK_FP32", 64)
    kw = make_inputs(batch=1, seqlen=300, nheads=2, headdim=5, ngroups=1, d_state=3, chunk_size=256,
                     D="head", z=True, dt_softplus=True, dt_bias=True, initial_states=True)
    assert ssd_mod._Plan(kw["x"].half(), kw["B"], 256).NB == 2
    _compare(kw)
    _compare(kw, dtype=torch.float16, tol=3e-3)


@pytest.mark.parametrize("tile", [(16, 16), (32, 16)])
def test_state_pass_in_tiles(tile, monkeypatch):
    # the sequential state passes (forward and backward) with the state cut into several (headdim, d_state) tiles,
    # packed sequences, an initial state and chunks of two blocks: each tile's share of dA must be summed once
    ssd_mod = sys.modules["mambakit.ops.ssd.triton"]
    monkeypatch.setattr(ssd_mod, "STATE_TILE", tile)
    monkeypatch.setattr(ssd_mod, "MAX_BLOCK", 16)
    monkeypatch.setattr(ssd_mod, "MAX_CHUNK_FP32", 32)
    kw = make_inputs(batch=2, seqlen=75, nheads=2, headdim=40, ngroups=1, d_state=33, chunk_size=32, nseqs=3,
                     initial_states=True, D="head", dt_softplus=True)
    plan = ssd_mod._Plan(kw["x"].float(), kw["B"], 32)
    assert plan.NB == 2 and plan.state_tiles(kw["x"].device) == tile
    _compare(kw)


@pytest.mark.parametrize("name", ["everything", "packed", "packed-unsorted-ids", "chunk-gt-seqlen"])
def test_state_passing_through_memory(name, monkeypatch):
    # the other way to the chunk states (used with few (batch, head) pairs): chunk-local states through memory and
    # separate state-passing kernels, forward and backward
    ssd_mod = sys.modules["mambakit.ops.ssd.triton"]
    monkeypatch.setattr(ssd_mod, "FUSED_STATES", False)
    monkeypatch.setattr(ssd_mod, "MAX_BLOCK", 16)
    monkeypatch.setattr(ssd_mod, "MAX_CHUNK_FP32", 64)
    _compare(make_inputs(**dict(CASES[name], chunk_size=64)))


@pytest.mark.parametrize("nchunks_parity", ["odd", "even"])
def test_state_pass_two_chunks_per_step(nchunks_parity, monkeypatch):
    # the forward pass with pairs of chunks per step: an odd number of chunks leaves the last pair half empty;
    # packed sequences and an initial state cross the pairs; float32 (blocks within chunks) and float16
    ssd_mod = sys.modules["mambakit.ops.ssd.triton"]
    monkeypatch.setattr(ssd_mod, "STATE_PAIRS", True)
    monkeypatch.setattr(ssd_mod, "MAX_BLOCK", 16)
    monkeypatch.setattr(ssd_mod, "MAX_CHUNK_FP32", 32)
    seqlen = 75 if nchunks_parity == "odd" else 128  # chunks of 32: 3 or 4
    kw = make_inputs(batch=2, seqlen=seqlen, nheads=2, headdim=6, ngroups=1, d_state=5, chunk_size=32, nseqs=3,
                     initial_states=True, D="head", dt_softplus=True)
    assert ssd_mod._Plan(kw["x"].float(), kw["B"], 32).pairs(kw["x"].device)
    _compare(kw)
    _compare(kw, dtype=torch.float16, tol=3e-3)


def test_plan_of_the_state_pass_on_an_h100(monkeypatch):
    # the launch plan on a 132-multiprocessor GPU: headdim cut until the pass has a program per multiprocessor,
    # two chunks per step for 16-bit inputs only
    ssd_mod = sys.modules["mambakit.ops.ssd.triton"]
    monkeypatch.setattr(ssd_mod, "multiprocessor_count", lambda device: 132)

    def plan(batch, seqlen, d_state, dtype=torch.bfloat16):
        x = torch.empty(batch, seqlen, 32, 64, dtype=dtype, device="meta")
        B = torch.empty(batch, seqlen, 1, d_state, dtype=dtype, device="meta")
        return ssd_mod._Plan(x, B, 128)

    assert plan(4, 16384, 64).state_tiles("cuda") == (32, 64)  # 128 (batch, head) pairs: 256 programs
    assert plan(4, 16384, 128).state_tiles("cuda") == (64, 64)  # two d_state tiles: 256 programs already
    assert plan(32, 2048, 64).state_tiles("cuda") == (64, 64)
    assert plan(4, 16384, 64).pairs("cuda") and not plan(4, 16384, 64, torch.float32).pairs("cuda")


@pytest.mark.parametrize("limit", [None, (0.05, 3.0)])
def test_dt_processing_kernel_and_its_gradient(limit):
    # the in-kernel dt processing against PyTorch's (float64): softplus far into both tails (log1p accuracy where
    # e^v is tiny, the identity past 20), the bias, the clamp, zero padding; and the gradients of raw dt and bias
    import torch.nn.functional as F

    ssd_mod = sys.modules["mambakit.ops.ssd.triton"]
    g = torch.Generator().manual_seed(3)
    dt = (torch.rand(2, 37, 3, generator=g, dtype=torch.float64) * 60 - 30).to(torch.bfloat16)
    bias = torch.randn(3, generator=g)
    ref = F.softplus(dt.double() + bias.double())
    if limit is not None:
        ref = ref.clamp(*limit)
    x = torch.randn(2, 37, 3, 5, generator=g).to(torch.bfloat16)
    out = ssd_mod._prepare_dt(dt, bias, True, limit, 40, x)
    assert out.shape == (2, 3, 40) and out.dtype == torch.float32
    assert torch.all(out[:, :, 37:] == 0)
    got = out[:, :, :37].transpose(1, 2).double()
    assert torch.allclose(got, ref, rtol=1e-6, atol=0), (got - ref).abs().max()
    x[1, 11, 2, 4] = float("inf")  # a non-finite x entry marks its (position, head) with NaN, nothing else
    marked = ssd_mod._prepare_dt(dt, bias, True, limit, 40, x)[:, :, :37].transpose(1, 2).double()
    assert torch.isnan(marked[1, 11, 2]) and torch.isnan(marked).sum() == 1
    assert torch.equal(marked.nan_to_num(0.0), got.masked_fill(torch.isnan(marked), 0.0))

    dt_leaf, bias_leaf = dt.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    v = F.softplus(dt_leaf + bias_leaf)
    v = v.clamp(*limit) if limit is not None else v
    upstream = torch.randn(2, 37, 3, generator=g, dtype=torch.float64)
    ref_dt, ref_bias = torch.autograd.grad(v, [dt_leaf, bias_leaf], upstream)
    ddt, dbias = ssd_mod.dt_processing_grad(upstream.float(), dt, bias, True, limit)
    assert ddt.dtype == dt.dtype and dbias.dtype == bias.dtype
    assert rel_err(ddt.double(), ref_dt) < 1e-2 and rel_err(dbias.double(), ref_bias) < 1e-5
