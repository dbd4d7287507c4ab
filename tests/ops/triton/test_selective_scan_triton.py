"""The Triton selective scan against the sequential reference, run on the CPU through the Triton interpreter.

Forward, final state and every gradient on small awkward shapes (fp32 rel err <= 1e-5 against a float64 reference),
bit-identical gradients run after run, half-precision inputs, strides, dispatch and the error cases.
"""
from __future__ import annotations

import dataclasses
import types

import pytest

pytest.importorskip("triton")

import torch

from mambakit.errors import MambaKitError
from mambakit.ops.selective_scan import selective_scan_fn, selective_scan_ref
from tests.conftest import rel_err
from tests.ops.test_selective_scan import make_inputs
from tests.ops.triton import interpreted_module

ss_triton = interpreted_module("mambakit.ops.selective_scan.triton")
ss_spans = interpreted_module("mambakit.ops.selective_scan.triton_spans")
selective_scan_triton = ss_triton.selective_scan_triton

SMALL = dict(chunk=8, fwd_block_t=4, bwd_block_t=2)  # several chunks and tiles even at seqlen <= 40


def _grad_names(kw):
    return [k for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad]


def _run(fn, kw, names, gy, gs, **extra):
    y, last = fn(**kw, return_last_state=True, **extra)
    loss = (y.double() * gy).sum() + (last.double() * gs).sum()
    grads = torch.autograd.grad(loss, [kw[n] for n in names])
    return y, last, dict(zip(names, grads))


def _check(batch, dim, d_state, seqlen, groups=0, tol=1e-5, cfg=None, **flags):
    kw = make_inputs(batch, dim, d_state, seqlen, groups=groups, dtype=torch.float32, seed=seqlen * 7 + dim, **flags)
    names = _grad_names(kw)
    kw64 = {k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
                and v.is_floating_point() else v) for k, v in kw.items()}
    g = torch.Generator().manual_seed(5)
    gy = torch.randn(batch, dim, seqlen, generator=g, dtype=torch.float64)
    gs = torch.randn(batch, dim, d_state, generator=g, dtype=torch.float64)
    y, last, grads = _run(selective_scan_triton, kw, names, gy, gs, **(cfg or {}))
    yr, lastr, gr = _run(selective_scan_ref, kw64, names, gy, gs)
    assert y.dtype == torch.float32 and last.dtype == torch.float32
    errs = {"y": rel_err(y, yr), "last_state": rel_err(last, lastr)}
    errs.update({f"d{n}": rel_err(grads[n], gr[n]) for n in names})
    for n in names:
        assert grads[n].shape == kw[n].shape and grads[n].dtype == kw[n].dtype
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"rel errors above {tol}: {bad}"


# (batch, dim, d_state, seqlen, groups, flags, cfg)
CASES = [
    pytest.param(2, 4, 4, 13, 0, {}, None, id="default-config"),
    pytest.param(2, 20, 16, 37, 0, {"with_h0": True, "packed": True}, dict(chunk=16),
                 id="dstate16-split-fwd-bwd-configs"),
    pytest.param(1, 3, 3, 1, 0, {}, SMALL, id="seqlen1"),
    pytest.param(1, 5, 1, 17, 0, {"with_h0": True}, SMALL, id="dstate1-prime"),
    pytest.param(2, 4, 8, 37, 0, {"with_h0": True, "packed": True}, SMALL, id="h0-seqidx"),
    pytest.param(1, 8, 2, 23, 2, {}, SMALL, id="grouped2"),
    pytest.param(1, 6, 5, 29, 2, {"with_h0": True}, SMALL, id="grouped-odd-groupsize"),
    pytest.param(1, 7, 4, 19, 0, {"with_D": False, "with_z": False, "with_bias": False}, SMALL, id="bare"),
    pytest.param(2, 3, 6, 40, 0, {"with_z": False, "packed": True}, dict(chunk=16, fwd_block_t=8, bwd_block_t=4),
                 id="no-z-packed-chunk16"),
    pytest.param(1, 2, 4, 31, 0, {"with_D": False, "with_h0": True}, dict(chunk=4, fwd_block_t=4, bwd_block_t=4),
                 id="chunk-equals-tile"),
]


@pytest.mark.parametrize("batch,dim,d_state,seqlen,groups,flags,cfg", CASES)
def test_matches_reference(batch, dim, d_state, seqlen, groups, flags, cfg):
    _check(batch, dim, d_state, seqlen, groups, cfg=cfg, **flags)


@pytest.mark.parametrize("spans,groups,flags", [(3, 0, {"with_h0": True, "packed": True}),
                                                (5, 2, {"with_z": False, "with_bias": False})],
                         ids=["3spans-h0-seqidx", "5spans-grouped-bare"])
def test_backward_in_spans_matches_reference(spans, groups, flags):
    """Forward and backward split along the sequence into spans that start from the other spans' carries (5 chunks
    of 8), with packed sequences (the carry's decay is 0 across a start) and an initial state."""
    cfg = ss_triton.pick_config(8, 4, 4 // max(groups, 1), max(groups, 1), 8, 4, 2)
    _check(2, 4, 8, 37, groups, cfg={"config": dataclasses.replace(cfg, fwd_spans=spans, bwd_spans=spans)}, **flags)


def test_forward_in_spans_without_grad_matches_reference():
    """Inference (no states saved for a backward): y and the last state of a forward in 4 spans."""
    kw = make_inputs(2, 4, 8, 37, dtype=torch.float32, with_h0=True, packed=True, seed=9)
    cfg = dataclasses.replace(ss_triton.pick_config(8, 4, 4, 1, 8, 4, 2), fwd_spans=4)
    with torch.no_grad():
        y, last = selective_scan_triton(**kw, return_last_state=True, config=cfg)
        kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
        yr, lastr = selective_scan_ref(**kw64, return_last_state=True)
    assert rel_err(y, yr) <= 1e-5 and rel_err(last, lastr) <= 1e-5


def test_spans_only_where_the_grid_leaves_the_gpu_idle(monkeypatch):
    props = types.SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda, slots = torch.device("cuda"), ss_spans.SLOTS_PER_SM
    assert ss_spans.span_split(0, slots, 32, 1024, cuda) == (1, 32)  # batch 8 x 2048 channels: a full wave already
    assert ss_spans.span_split(0, slots, 32, 768, cuda) == (8, 4)  # 8 x 1536: 0.73 of a wave
    assert ss_spans.span_split(0, slots, 32, 96, cuda) == (32, 1)  # batch 1: at most one span per chunk
    assert ss_spans.span_split(0, slots, 32, 96, torch.device("cpu")) == (1, 32)
    assert ss_spans.span_split(3, slots, 32, 1024, cuda) == (3, 11)  # a configured count
    assert ss_spans.span_split(0, ss_spans.FWD_BUSY_PER_SM, 32, 768, cuda) == (1, 32)  # the forward at 8 x 1536


def test_no_softplus_and_large_decay():
    kw = make_inputs(1, 4, 4, 21, dtype=torch.float32, delta_scale=3.0, seed=3)
    kw["delta_softplus"] = False
    kw["delta"] = kw["delta"].detach().abs().requires_grad_()  # positive steps, some large (strong decay)
    names = _grad_names(kw)
    kw64 = {k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for k, v in kw.items()}
    gen = torch.Generator().manual_seed(21)
    gy = torch.randn(1, 4, 21, generator=gen, dtype=torch.float64)
    gs = torch.randn(1, 4, 4, generator=gen, dtype=torch.float64)
    y, last, g = _run(selective_scan_triton, kw, names, gy, gs, **SMALL)
    yr, lastr, gr = _run(selective_scan_ref, kw64, names, gy, gs)
    assert rel_err(y, yr) <= 1e-5 and rel_err(last, lastr) <= 1e-5
    for n in names:
        assert rel_err(g[n], gr[n]) <= 1e-5, n


def test_backward_is_deterministic():
    kw = make_inputs(1, 8, 4, 25, groups=2, dtype=torch.float32, with_h0=True, packed=True, seed=11)
    names = _grad_names(kw)
    gen = torch.Generator().manual_seed(25)
    gy = torch.randn(1, 8, 25, generator=gen, dtype=torch.float64)
    gs = torch.randn(1, 8, 4, generator=gen, dtype=torch.float64)
    y1, l1, g1 = _run(selective_scan_triton, kw, names, gy, gs, **SMALL)
    y2, l2, g2 = _run(selective_scan_triton, kw, names, gy, gs, **SMALL)
    assert torch.equal(y1, y2) and torch.equal(l1, l2)
    for n in names:
        assert torch.equal(g1[n], g2[n]), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    kw = make_inputs(2, 4, 4, 19, dtype=torch.float32, seed=2)
    half = ("u", "delta", "B", "C", "z")
    kw = {k: (v.detach().to(dtype).requires_grad_() if k in half else v) for k, v in kw.items()}
    names = _grad_names(kw)
    kw64 = {k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for k, v in kw.items()}
    gen = torch.Generator().manual_seed(8)
    # the kernel receives dLoss/dy in y's dtype: give the reference the same rounded gradient
    gy = torch.randn(2, 4, 19, generator=gen, dtype=torch.float64).to(dtype).double()
    gs = torch.randn(2, 4, 4, generator=gen, dtype=torch.float64)
    y, last, g = _run(selective_scan_triton, kw, names, gy, gs, **SMALL)
    yr, lastr, gr = _run(selective_scan_ref, kw64, names, gy, gs)
    assert y.dtype == dtype and last.dtype == torch.float32
    assert rel_err(y, yr) <= 1e-2 and rel_err(last, lastr) <= 1e-3
    for n in names:
        assert g[n].dtype == kw[n].dtype
        assert rel_err(g[n], gr[n]) <= 1e-2, n


def test_non_contiguous_inputs_and_3d_bc_grads():
    batch, dim, N, L = 2, 4, 3, 15
    g = torch.Generator().manual_seed(9)
    u = torch.randn(batch, L, dim, generator=g).transpose(1, 2).requires_grad_()  # channel-last views
    delta = (torch.randn(batch, L, dim, generator=g) * 0.5 - 1).transpose(1, 2).requires_grad_()
    z = torch.randn(batch, L, dim, generator=g).transpose(1, 2)
    A = -torch.rand(N, dim, generator=g).t()
    B = torch.randn(batch, L, N, generator=g).transpose(1, 2).requires_grad_()
    C = torch.randn(batch, L, N, generator=g).transpose(1, 2).requires_grad_()
    args = dict(D=torch.randn(dim, generator=g), z=z, delta_bias=torch.randn(dim, generator=g) * 0.3,
                delta_softplus=True)
    y = selective_scan_triton(u, delta, A, B, C, **args, **SMALL)
    yr = selective_scan_ref(u, delta, A, B, C, **args)
    assert rel_err(y, yr) <= 1e-5
    gy = torch.randn(y.shape, generator=g)
    gt = torch.autograd.grad((y * gy).sum(), [u, delta, B, C])
    gr = torch.autograd.grad((yr * gy).sum(), [u, delta, B, C])
    for a, b in zip(gt, gr):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-4


def test_channel_last_dstate16_default_config():
    """The Mamba-1 block's layout at d_state 16 (the forward's and backward's own state splits) against the
    reference, forward and gradients."""
    batch, dim, N, L = 2, 24, 16, 45
    g = torch.Generator().manual_seed(13)
    u = torch.randn(batch, L, dim, generator=g).transpose(1, 2).requires_grad_()
    delta = (torch.randn(batch, L, dim, generator=g) * 0.5 - 1).transpose(1, 2).requires_grad_()
    z = torch.randn(batch, L, dim, generator=g).transpose(1, 2).requires_grad_()
    A = (-torch.rand(dim, N, generator=g) - 0.2).requires_grad_()
    bc = torch.randn(batch, L, 2 * N + 3, generator=g)
    B = bc[:, :, 3:3 + N].transpose(1, 2).requires_grad_()
    C = bc[:, :, 3 + N:].transpose(1, 2).requires_grad_()
    args = dict(D=torch.randn(dim, generator=g), z=z, delta_bias=torch.randn(dim, generator=g) * 0.3,
                delta_softplus=True)
    y = selective_scan_triton(u, delta, A, B, C, **args, chunk=16)
    yr = selective_scan_ref(u, delta, A, B, C, **args)
    assert rel_err(y, yr) <= 1e-5
    gy = torch.randn(y.shape, generator=g)
    leaves = [u, delta, A, B, C, z]
    gt = torch.autograd.grad((y * gy).sum(), leaves)
    gr = torch.autograd.grad((yr * gy).sum(), leaves)
    for a, b in zip(gt, gr):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-4


def test_no_grad_and_dispatch():
    kw = make_inputs(1, 4, 4, 9, dtype=torch.float32, seed=4)
    with torch.no_grad():
        y = selective_scan_fn(**kw, backend="triton")
        yr = selective_scan_ref(**kw)
    assert rel_err(y, yr) <= 1e-5
    y2, last = selective_scan_triton(**kw, return_last_state=True)
    assert last.shape == (1, 4, 4) and rel_err(y2, yr) <= 1e-5


def test_float64_falls_back_to_torch_path():
    kw = make_inputs(1, 3, 2, 7, dtype=torch.float64, seed=6)
    y = selective_scan_triton(**kw)
    assert y.dtype == torch.float64 and rel_err(y, selective_scan_ref(**kw)) <= 1e-12


def test_errors(monkeypatch):
    kw = make_inputs(1, 2, 257, 3, dtype=torch.float32, seed=1)
    with pytest.raises(MambaKitError, match="d_state <= 256"):
        selective_scan_triton(**kw)
    kw = make_inputs(1, 2, 2, 3, dtype=torch.float32, seed=1)
    with pytest.raises(MambaKitError, match="delta"):
        selective_scan_triton(**{**kw, "delta": kw["delta"][..., :2]})
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at call time: CPU tensors without the interpreter
    with pytest.raises(MambaKitError, match="CUDA"):
        selective_scan_triton(**kw)


def test_config_keeps_time_in_registers():
    """The launch shapes the performance relies on (benchmarks/sweep_selective_scan.py): at d_state 16 the forward
    gives a channel 2 lanes of 8 states, the backward 4 lanes of 4 states."""
    cfg = ss_triton.pick_config(16, 2048, 2048, 1)
    assert (cfg.NH, cfg.NL, cfg.fwd_block_d, cfg.fwd_block_t, cfg.fwd_warps, cfg.chunk) == (8, 2, 16, 8, 1, 64)
    assert (cfg.bwd_split, cfg.bwd_block_d, cfg.bwd_block_t, cfg.bwd_warps) == ((4, 4), 16, 4, 1)
    for n in (1, 2, 3, 16, 64, 256):
        c = ss_triton.pick_config(n, 48, 16, 3)
        assert c.NH * c.NL >= n and c.bwd_split[0] * c.bwd_split[1] >= n
        assert 16 % c.fwd_block_d == 0 and 16 % c.bwd_block_d == 0
