"""The fused Mamba-2 inner path (Triton conv + SSD + gated norm, the gradient of zxbcdt written in place,
recomputing backward) against the float64 composition with the recurrence, on the CPU interpreter: output and
every gradient, seq_idx with padding, and bit-identical gradients run after run."""
from __future__ import annotations

import sys

import pytest

pytest.importorskip("triton")

import torch

from mambakit.ops.mamba2_inner import mamba2_inner
from tests.conftest import rel_err
from tests.ops.test_mamba2_inner import grads_of2, make_inner2
from tests.ops.triton import interpreted_module

interpreted_module("mambakit.ops.ssd.triton")
interpreted_module("mambakit.ops.norm.triton")
interpreted_module("mambakit.ops.mamba2_inner")
interpreted_module("mambakit.ops.mamba2_inner.fused")


def _to32(zxbcdt, kw):
    return zxbcdt.detach().float().requires_grad_(), {
        k: (v.detach().float().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _compare(zxbcdt, kw, extra, runs=1):
    ref, ref_grads = grads_of2(zxbcdt, kw, backend="ref", **extra)
    z32, kw32 = _to32(zxbcdt, kw)
    results = [grads_of2(z32, kw32, backend="triton", **extra) for _ in range(runs)]
    out, grads = results[0]
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    names = ["zxbcdt"] + [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    for name, a, b in zip(names, grads, ref_grads):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < 2e-5, name
    for _, other in results[1:]:
        for a, c in zip(grads, other):
            assert torch.equal(a, c)


@pytest.mark.parametrize("opts", [dict(), dict(norm_before_gate=True, bias=False, ngroups=1),
                                  dict(D_hdim=True, dt_limit=(0.05, 0.9), seqlen=21)])
def test_fused_matches_float64_reference(opts):
    limit = opts.pop("dt_limit", (0.0, float("inf")))
    nbg = opts.pop("norm_before_gate", False)
    zxbcdt, kw, dims = make_inner2(**opts)
    _compare(zxbcdt, kw, dict(dims, chunk_size=16, norm_before_gate=nbg, dt_limit=limit))


def test_fused_seq_idx_padding_and_determinism():
    zxbcdt, kw, dims = make_inner2(batch=2, seqlen=12)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7, [-1] * 3 + [1] * 3 + [2] * 6])
    _compare(zxbcdt, kw, dict(dims, chunk_size=16, seq_idx=seq_idx), runs=2)


def test_official_split_conv1d_scan_runs_the_fused_op():
    from mambakit.compat.mamba_ssm.ops.triton.ssd_combined import (
        mamba_split_conv1d_scan_combined, mamba_split_conv1d_scan_ref)

    zxbcdt, kw, dims = make_inner2(seqlen=19, D_hdim=True)
    z32, kw32 = _to32(zxbcdt, kw)
    args = (kw32["conv_weight"], kw32["conv_bias"], kw32["dt_bias"], kw32["A"], kw32["D"], 16)
    opts = dict(rmsnorm_weight=kw32["norm_weight"], rmsnorm_eps=1e-5, outproj_weight=kw32["out_weight"],
                outproj_bias=kw32["out_bias"], ngroups=dims["ngroups"], norm_before_gate=True)
    fused = mamba_split_conv1d_scan_combined(z32, *args, **opts)
    assert fused.grad_fn is not None and "Mamba2InnerFused" in type(fused.grad_fn).__name__
    ref = mamba_split_conv1d_scan_ref(zxbcdt.detach(), *(a.detach().double() if isinstance(a, torch.Tensor) else a
                                                         for a in args),
                                      **{k: (v.detach().double() if isinstance(v, torch.Tensor) else v)
                                         for k, v in opts.items()})
    assert rel_err(fused, ref) < 1e-5


def test_bf16_input_with_float32_weights_gives_gradients_in_the_parameters_dtypes():
    # what bf16 autocast hands the op: a bf16 in_proj output, float32 parameters, cast inside the op (their
    # gradients leave float32 without a cast node). Only dtypes, shapes and finiteness here: the interpreter's
    # bf16 tl.dot is unreliable (the values are checked by tests/ops/test_mamba2_inner_gpu.py)
    zxbcdt, kw, extra = make_inner2()
    z16, kw32 = _to32(zxbcdt, kw)
    z16 = z16.detach().bfloat16().requires_grad_()
    out, grads = grads_of2(z16, kw32, backend="triton", **extra)
    leaves = [z16] + [v for v in kw32.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    assert out.dtype == torch.bfloat16
    for leaf, g in zip(leaves, grads):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape and torch.isfinite(g).all()


def _saved_storages(fn):
    """fn() under a saved-tensor hook -> (its result, {storage address: bytes} of what autograd saved)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("save_states", [False, True])
def test_saved_bytes_are_y_and_rstd_beyond_the_inputs(monkeypatch, save_states):
    # the design: besides its inputs (zxbcdt, the weights) the op keeps only the SSD output y (d_inner per position)
    # and the norm's rstd (ngroups float32 per position); the chunk states are recomputed in the backward (or kept,
    # with SAVE_STATES: then exactly their bytes more)
    fused = sys.modules["mambakit.ops.mamba2_inner.fused"]
    monkeypatch.setattr(fused, "SAVE_STATES", save_states)
    batch, seqlen, nheads, headdim, ngroups, d_state = 2, 40, 4, 4, 2, 5
    zxbcdt, kw = _to32(*make_inner2(batch=batch, seqlen=seqlen, nheads=nheads, headdim=headdim, ngroups=ngroups,
                                    d_state=d_state)[:2])
    out, saved = _saved_storages(lambda: mamba2_inner(zxbcdt, **kw, headdim=headdim, ngroups=ngroups, chunk_size=16,
                                                      backend="triton"))
    inputs = {t.untyped_storage().data_ptr() for t in [zxbcdt, *kw.values()] if isinstance(t, torch.Tensor)}
    assert zxbcdt.untyped_storage().data_ptr() in saved
    new = sum(n for ptr, n in saved.items() if ptr not in inputs)
    expected = batch * seqlen * (nheads * headdim + ngroups) * 4
    if save_states:
        nchunks, Lpad = 40 // 16 + 1, 48  # float32: 16-position chunks
        expected += (batch * nchunks * nheads * headdim * d_state + 2 * batch * nheads * Lpad) * 4
    assert new == expected
    assert out.grad_fn is not None


def test_recomputed_states_give_the_gradients_of_kept_states_bit_for_bit(monkeypatch):
    fused = sys.modules["mambakit.ops.mamba2_inner.fused"]
    zxbcdt, kw, dims = make_inner2(batch=2, seqlen=37)
    z32, kw32 = _to32(zxbcdt, kw)
    seq_idx = torch.tensor([[0] * 20 + [1] * 17, [-1] * 5 + [0] * 32])
    results = []
    for keep in (True, False):
        monkeypatch.setattr(fused, "SAVE_STATES", keep)
        results.append(grads_of2(z32, kw32, backend="triton", chunk_size=16, seq_idx=seq_idx, **dims))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("opts", [dict(), dict(batch=1, seqlen=21, ngroups=1, bias=False)])
def test_A_log_form_matches_the_A_form(opts):
    # A_log in place of A (what the layer passes): the SSD kernels form A = -exp(A_log) and give A_log's gradient
    # (its per-chunk parts times A): the A form's output and gradients up to float32 rounding, run after run the same
    zxbcdt, kw, dims = make_inner2(**opts)
    z32, kw32 = _to32(zxbcdt, kw)
    A_log = torch.log(-kw32.pop("A")).detach().requires_grad_()
    w = torch.randn(zxbcdt.shape[0], zxbcdt.shape[1], kw["out_weight"].shape[0], generator=torch.Generator()
                    .manual_seed(3))
    leaves = [z32, A_log] + [v for v in kw32.values() if isinstance(v, torch.Tensor)]
    results = []
    for form in ("A", "A_log", "A_log"):
        a = dict(A=-torch.exp(A_log)) if form == "A" else dict(A=None, A_log=A_log)
        out = mamba2_inner(z32, **kw32, **a, **dims, chunk_size=16, backend="triton")
        results.append((out, torch.autograd.grad((out * w).sum(), leaves)))
    (out_a, grads_a), (out_b, grads_b), (out_c, grads_c) = results
    assert rel_err(out_b, out_a) < 1e-6
    for a, b, c in zip(grads_a, grads_b, grads_c):
        assert torch.isfinite(b).all() and rel_err(b, a) < 1e-6 and torch.equal(b, c)
    ref = mamba2_inner(zxbcdt, **{k: v for k, v in kw.items() if k != "A"}, A=None,
                       A_log=torch.log(-kw["A"]).detach().requires_grad_(), **dims, chunk_size=16, backend="ref")
    assert rel_err(out_b, ref) < 1e-5


def test_layer_fused_path_matches_its_composition():
    # the Mamba2 layer's fused inner path (what it takes on CUDA: A_log handed to the op, the conv weight uncast)
    # against its own composition on the CPU: output and every parameter's gradient
    from mambakit.layers.mamba2 import Mamba2

    torch.manual_seed(0)
    layer = Mamba2(16, d_state=8, headdim=4, ngroups=2, chunk_size=16)
    h = torch.randn(2, 21, 16, requires_grad=True)
    w = torch.randn(2, 21, 16)
    results = []
    for fused in (False, True):
        out = layer._fused_inner(h, None) if fused else layer(h)
        params = [h] + list(layer.parameters())
        results.append((out, torch.autograd.grad((out * w).sum(), params)))
    (ref, ref_grads), (out, grads) = results
    assert rel_err(out, ref) < 1e-5
    names = ["h"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        assert a.shape == b.shape and rel_err(a, b) < 2e-5, name
