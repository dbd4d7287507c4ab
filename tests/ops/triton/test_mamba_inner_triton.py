"""The fused Mamba-1 inner path (Triton conv + scan, channel-last buffers, recomputing backward) against the
sequential float64 composition, on the CPU interpreter: output and every gradient, seq_idx, no biases, and
bit-identical gradients run after run."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch

from tests.conftest import rel_err
from tests.ops.test_mamba_inner import grads_of, make_inner
from tests.ops.triton import interpreted_module

inner = interpreted_module("mambakit.ops.mamba_inner")
interpreted_module("mambakit.ops.mamba_inner.fused")


def _to32(xz, kw):
    xz32 = xz.detach().float().requires_grad_()
    return xz32, {k: (v.detach().float().requires_grad_() if isinstance(v, torch.Tensor) else v)
                  for k, v in kw.items()}


@pytest.mark.parametrize("shape,bias", [(dict(seqlen=13), True), (dict(seqlen=13), False),
                                        (dict(batch=1, d_inner=5, d_state=4, seqlen=1), True),
                                        (dict(batch=3, d_inner=9, d_state=5, rank=3, seqlen=20, width=3), True)])
def test_fused_matches_float64_reference(shape, bias):
    xz, kw = make_inner(**shape, bias=bias)
    ref, ref_grads = grads_of(inner.mamba_inner, xz, kw, backend="ref")
    xz32, kw32 = _to32(xz, kw)
    out, grads = grads_of(inner.mamba_inner, xz32, kw32, backend="triton")
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    for name, a, b in zip(["xz"] + [k for k, v in kw.items() if isinstance(v, torch.Tensor)], grads, ref_grads):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-5, name


def test_fused_seq_idx_and_determinism():
    xz, kw = make_inner(batch=2, seqlen=12)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7, [-1] * 3 + [1] * 3 + [2] * 6])  # -1: padding (conv output 0)
    ref, ref_grads = grads_of(inner.mamba_inner, xz, kw, backend="ref", seq_idx=seq_idx)
    xz32, kw32 = _to32(xz, kw)
    out, grads = grads_of(inner.mamba_inner, xz32, kw32, backend="triton", seq_idx=seq_idx)
    out2, grads2 = grads_of(inner.mamba_inner, xz32, kw32, backend="triton", seq_idx=seq_idx)
    assert rel_err(out, ref) < 1e-5
    for a, b, c in zip(grads, ref_grads, grads2):
        assert rel_err(a, b) < 1e-5
        assert torch.equal(a, c)


def test_fused_without_grad_and_nan_stays_causal():
    xz, kw = make_inner(seqlen=10)
    xz32, kw32 = _to32(xz, kw)
    with torch.no_grad():
        clean = inner.mamba_inner(xz32.transpose(1, 2), **kw32, backend="triton")
        bad = xz32.detach().clone()
        bad[:, 6] = float("nan")
        out = inner.mamba_inner(bad.transpose(1, 2), **kw32, backend="triton")
    assert torch.isfinite(out[:, :6]).all() and torch.equal(out[:, :6], clean[:, :6])
    assert not torch.isfinite(out[:, 6:]).all()


def test_mamba_layer_takes_the_fused_path_and_matches_the_reference():
    from mambakit.layers.mamba import Mamba

    torch.manual_seed(0)
    fused = Mamba(12, d_state=4, expand=1, scan_backend="triton")
    ref = Mamba(12, d_state=4, expand=1, scan_backend="ref")
    ref.load_state_dict(fused.state_dict())
    h = torch.randn(2, 9, 12)
    calls = []
    orig = inner.mamba_inner
    import mambakit.layers.mamba as layer_module

    def spy(*a, **k):
        calls.append(k.get("backend"))
        return orig(*a, **k)

    layer_module.mamba_inner, saved = spy, layer_module.mamba_inner
    try:
        out = fused(h)
    finally:
        layer_module.mamba_inner = saved
    assert calls == ["triton"]
    expect = ref(h)
    assert rel_err(out, expect) < 1e-5
    out.square().sum().backward()
    expect.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-4, name


def test_mamba_layer_prefill_with_a_state_takes_the_fused_path():
    """Chunked prefill through the fused inference form (state in, state out) equals one reference forward, and
    the states after it equal the reference's."""
    from mambakit.layers.mamba import Mamba

    torch.manual_seed(1)
    fused = Mamba(12, d_state=4, expand=1, scan_backend="triton")
    ref = Mamba(12, d_state=4, expand=1, scan_backend="ref")
    ref.load_state_dict(fused.state_dict())
    h = torch.randn(2, 13, 12)
    with torch.no_grad():
        s_f, s_r = fused.allocate_state(2), ref.allocate_state(2)
        out = torch.cat([fused(h[:, :6], state=s_f), fused(h[:, 6:], state=s_f)], 1)
        expect = ref(h, state=s_r)
    assert rel_err(out, expect) < 1e-5
    assert rel_err(s_f.conv, s_r.conv) < 1e-6 and rel_err(s_f.ssm, s_r.ssm) < 1e-5


def test_fused_bf16_input_with_float32_weights_gives_float32_gradients():
    # what bf16 autocast hands the op: a bf16 in_proj output, float32 parameters. The weights are cast inside the
    # op, so their gradients come back float32 (no cast node of autograd's), and agree with the float64 reference
    # to bf16 accuracy
    xz, kw = make_inner(seqlen=13)
    ref, ref_grads = grads_of(inner.mamba_inner, xz, kw, backend="ref")
    xz16, kw32 = _to32(xz, kw)
    xz16 = xz16.detach().bfloat16().requires_grad_()
    out, grads = grads_of(inner.mamba_inner, xz16, kw32, backend="triton")
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 2e-2
    names = ["xz"] + [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    for name, a, b, leaf in zip(names, grads, ref_grads, [xz16] + [v for v in kw32.values()
                                                                  if isinstance(v, torch.Tensor)]):
        assert a.dtype == leaf.dtype and a.shape == b.shape, name
        assert rel_err(a, b) < 3e-2, name


def test_A_log_form_matches_the_A_form():
    # A_log in place of A (what the layer passes): the scan kernels form A = -exp(A_log) and give A_log's gradient
    # (their per-row parts times A): the A form's output and gradients up to float32 rounding, run after run the same
    xz, kw = make_inner(seqlen=13)
    xz32, kw32 = _to32(xz, kw)
    A_log = torch.log(-kw32.pop("A")).detach().requires_grad_()
    leaves = [xz32, A_log] + [v for v in kw32.values() if isinstance(v, torch.Tensor)]
    results = []
    for form in ("A", "A_log", "A_log"):
        a = dict(A=-torch.exp(A_log)) if form == "A" else dict(A=None, A_log=A_log)
        out = inner.mamba_inner(xz32.transpose(1, 2), **kw32, **a, backend="triton")
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)  # as grads_of
        results.append((out, torch.autograd.grad((out.double() * w).sum(), leaves)))
    (out_a, grads_a), (out_b, grads_b), (out_c, grads_c) = results
    assert rel_err(out_b, out_a) < 1e-6
    for a, b, c in zip(grads_a, grads_b, grads_c):
        assert torch.isfinite(b).all() and rel_err(b, a) < 1e-6 and torch.equal(b, c)
    ref, ref_grads = grads_of(inner.mamba_inner, xz, kw, backend="ref")
    assert rel_err(out_b, ref) < 1e-5
    # A_log's gradient against the float64 chain rule: dA_log = dA * A
    assert rel_err(grads_b[1], ref_grads[-3] * kw["A"]) < 1e-5
