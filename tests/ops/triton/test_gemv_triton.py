"""The norm-fused GEMV kernels (`mambakit.ops.triton.gemv`) against the float64 PyTorch composition, on the CPU
interpreter (awkward sizes: in_features not a multiple of the k block, several output-row programs so that only
one writes the residual, more batch rows than one program takes, groups, a strided gate), and the fused mixer steps
(`pre_norm`, the gated norm + out_proj) against the unfused ones, step after step."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from mambakit.errors import MambaKitError  # noqa: E402
from mambakit.layers.mamba import Mamba  # noqa: E402
from mambakit.layers.mamba2 import Mamba2  # noqa: E402
from mambakit.layers.step import PreNorm  # noqa: E402
from mambakit.ops import norm_linear  # noqa: E402
from mambakit.ops.cpu_linear import cpu_linear, use_cpu_linear  # noqa: E402
from mambakit.ops.norm import add_rms_norm  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.ops.triton import interpreted_module, sm90_resource_usage  # noqa: E402

gemv = interpreted_module("mambakit.ops.triton.gemv")

SHAPES = [(1, 5, 1), (3, 24, 7), (17, 40, 33)]  # rows, in_features, out_features


def _rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("rows,k,n", SHAPES)
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("res_fp32", [True, False])
def test_add_rms_norm_gemv(rows, k, n, first, res_fp32):
    g = torch.Generator().manual_seed(rows * 100 + k + n)
    bias = not first
    hidden, residual = _rand(g, rows, 1, k), (None if first else _rand(g, rows, 1, k))
    nw, w = _rand(g, k) + 1, _rand(g, n, k, scale=k ** -0.5)
    b = _rand(g, n) if bias else None
    ref, ref_res = norm_linear.add_rms_norm_linear(hidden, residual, nw, 1e-5, res_fp32, w, b, backend="ref")
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    out, res = gemv.add_rms_norm_gemv_triton(f32(hidden), f32(residual), nw.float(), 1e-5, res_fp32, w.float(),
                                             f32(b))
    assert out.shape == (rows, 1, n) and out.dtype == torch.float32
    assert res.shape == (rows, 1, k) and res.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    assert rel_err(res, ref_res) < 1e-6


def test_add_rms_norm_gemv_half_matches_the_unfused_rounding():
    g = torch.Generator().manual_seed(3)
    hidden, residual = _rand(g, 2, 40).half(), _rand(g, 2, 40).float()
    nw, w = (_rand(g, 40) + 1).half(), _rand(g, 9, 40, scale=0.2).half()
    out, res = gemv.add_rms_norm_gemv_triton(hidden, residual, nw, 1e-5, True, w)
    normed, ref_res = add_rms_norm(hidden, residual, nw, 1e-5, True, backend="torch")
    ref = normed.double() @ w.double().T  # the fp16 norm output, then an exact product
    assert torch.equal(res, ref_res) and out.dtype == torch.float16
    assert rel_err(out, ref) < 1e-3


GATED = [(ngroups, before, True) for ngroups in (1, 2, 4) for before in (False, True)] + [(1, False, False)]


@pytest.mark.parametrize("rows,k,n", SHAPES[1:])
@pytest.mark.parametrize("ngroups,norm_before_gate,gate", GATED)
def test_rms_norm_gated_gemv(rows, k, n, ngroups, norm_before_gate, gate):
    g = torch.Generator().manual_seed(rows + k * 10 + ngroups)
    y = _rand(g, rows, k)
    zx = _rand(g, rows, 2 * k)
    z = zx[:, :k] if gate else None  # a strided view, as the decode step passes it
    nw, w, b = _rand(g, k) + 1, _rand(g, n, k, scale=k ** -0.5), _rand(g, n)
    ref = norm_linear.rms_norm_gated_linear(y, z, nw, 1e-5, k // ngroups, norm_before_gate, w, b, backend="ref")
    out = gemv.rms_norm_gated_gemv_triton(y.float(), None if z is None else z.float(), nw.float(), 1e-5,
                                          k // ngroups, norm_before_gate, w.float(), b.float())
    assert out.shape == (rows, n)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_plain_gemv(rows, k, n):
    g = torch.Generator().manual_seed(k)
    x, w, b = _rand(g, rows, k), _rand(g, n, k), _rand(g, n)
    assert rel_err(gemv.gemv_triton(x.float(), w.float(), b.float()), x @ w.T + b) < 1e-6


def test_nan_is_not_hidden():
    x, w = torch.ones(2, 24), torch.ones(5, 24)
    x[1, 3] = float("nan")
    out, _ = gemv.add_rms_norm_gemv_triton(x, None, torch.ones(24), 1e-5, True, w)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()


def test_bad_shapes_raise():
    x, w = torch.ones(2, 24), torch.ones(5, 24)
    with pytest.raises(MambaKitError, match="last dim 24"):
        gemv.gemv_triton(torch.ones(2, 23), w)
    with pytest.raises(MambaKitError, match="bias"):
        gemv.gemv_triton(x, w, torch.ones(4))
    with pytest.raises(MambaKitError, match="norm weight"):
        gemv.add_rms_norm_gemv_triton(x, None, torch.ones(23), 1e-5, True, w)
    with pytest.raises(MambaKitError, match="group_size"):
        gemv.rms_norm_gated_gemv_triton(x, x, torch.ones(24), 1e-5, 7, False, w)
    with pytest.raises(MambaKitError, match="one shape"):
        gemv.add_rms_norm_gemv_triton(x, torch.ones(3, 24), torch.ones(24), 1e-5, True, w)


def test_auto_keeps_the_cpu_path():
    """On the CPU "auto" is the composition, bit for bit (the norm, then `linear_step`: its float32-accumulating
    product for bfloat16 weights where fbgemm exists, else the matrix-vector product)."""
    g = torch.Generator().manual_seed(0)
    h, r, nw, w = (t.to(torch.bfloat16) for t in (_rand(g, 1, 24), _rand(g, 1, 24), _rand(g, 24), _rand(g, 7, 24)))
    out, res = norm_linear.add_rms_norm_linear(h, r, nw, 1e-5, True, w)
    normed, ref_res = add_rms_norm(h, r, nw, 1e-5, True)
    ref = cpu_linear(normed, w) if use_cpu_linear(normed, w) else torch.mv(w, normed[0])[None]
    assert torch.equal(res, ref_res) and torch.equal(out, ref)
    assert not norm_linear.use_gemv(h, w)


# ----------------------------------------------------------------------------------------------------------------------
# the mixers' fused steps against the unfused ones
@pytest.fixture
def fused(monkeypatch):
    """Make backend="auto" take the kernels for the CPU tensors here (the interpreter), the plain GEMV included."""
    monkeypatch.setattr(norm_linear, "use_gemv", lambda *tensors, **kw: True)
    monkeypatch.setattr(norm_linear, "PLAIN_GEMV", True)


def _compare_steps(layer, d_model, batch=3, steps=2):
    g = torch.Generator().manual_seed(1)
    nw = (torch.rand(d_model, generator=g) + 0.5)
    s_fused, s_ref = layer.allocate_state(batch), layer.allocate_state(batch)
    for s in (s_fused, s_ref):
        s.conv.normal_(generator=g)
    s_ref.conv.copy_(s_fused.conv)
    residual = None
    for _ in range(steps):
        hidden = torch.randn(batch, 1, d_model, generator=g)
        normed, ref_res = add_rms_norm(hidden, residual, nw, 1e-5, True, backend="torch")
        with torch.no_grad():
            ref = layer.step(normed, s_ref)
            out, res = layer.step(hidden, s_fused, pre_norm=PreNorm(residual, nw, 1e-5, True))
        assert out.shape == ref.shape == (batch, 1, d_model) and res.shape == (batch, 1, d_model)
        assert rel_err(out, ref) < 1e-5 and rel_err(res, ref_res) < 1e-6
        assert rel_err(s_fused.ssm, s_ref.ssm) < 1e-5 and rel_err(s_fused.conv, s_ref.conv) < 1e-5
        residual = res


def test_mamba1_fused_step_equals_unfused(fused):
    torch.manual_seed(0)
    _compare_steps(Mamba(20, d_state=5, dt_rank=3).eval(), 20)


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_mamba2_fused_step_equals_unfused(fused, ngroups, norm_before_gate):
    torch.manual_seed(0)
    layer = Mamba2(24, d_state=6, headdim=12, ngroups=ngroups, norm_before_gate=norm_before_gate).eval()
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
    _compare_steps(layer, 24)


def test_step_without_pre_norm_keeps_its_signature():
    layer = Mamba(16, d_state=4).eval()
    state = layer.allocate_state(2)
    with torch.no_grad():
        out = layer.step(torch.randn(2, 16), state)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 16)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_lm_decode_through_the_fused_steps(fused, monkeypatch, arch):
    """Prefill, then steps through the fused kernels: the logits of the unfused steps and of the full forward."""
    from tests.models.test_lm import tiny

    model = tiny(arch)
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        got = {}
        for name, fn in (("fused", lambda *t, **kw: True), ("unfused", lambda *t, **kw: False)):
            monkeypatch.setattr(norm_linear, "use_gemv", fn)
            cache = model.allocate_cache(2)
            model(ids[:, :8], cache=cache)
            got[name] = torch.stack([model.step(ids[:, t], cache) for t in range(8, 10)], 1)
    assert rel_err(got["fused"], got["unfused"]) < 1e-5
    assert rel_err(got["fused"], full[:, 8:]) < 1e-5


def test_gpu_launch_config(monkeypatch):
    """What a GPU gets (the interpreter gets small blocks): powers of two, the k block dividing the group where it
    can, at most 8K products per k step, enough programs to cover 132 multiprocessors at batch 1."""
    monkeypatch.setattr(gemv, "interpreted", lambda: False)
    monkeypatch.setattr(gemv, "multiprocessor_count", lambda device: 132)
    for batch in (1, 2, 5, 8, 16, 40):
        for k, n in ((768, 3072), (1536, 768), (768, 3352), (2048, 8192), (4096, 2048), (24, 40)):
            bb, bn, bk, _ = gemv.launch_config(batch, n, k, None)
            assert all(v & (v - 1) == 0 for v in (bb, bn, bk)) and bb <= gemv.MAX_BLOCK_B
            assert bb * bn * bk <= 8192 and (k % bk == 0 or k < 64)
            if batch == 1 and n >= 768:
                assert -(-n // bn) >= 132



def test_kernel_compiles_for_sm90_without_spills():
    """The interpreter compiles nothing: build the kernel for Hopper (no GPU needed) as the 130M in_proj at batch 1
    and Mamba-2's tail at batch 8 use it, and read its resource usage: no local memory (no register spills)."""
    ptrs = {"b_ptr": "*fp32", "res_ptr": "*fp32", "eps": "fp32"}
    fixed = dict(HAS_B=True, HAS_BIAS=False, NORM_BEFORE_GATE=False)
    usage = sm90_resource_usage("mambakit.ops.triton.gemv", "_gemv_kernel", "*bf16", {
        "add_norm": (ptrs, dict(fixed, MODE=1, BLOCK_B=1, BLOCK_N=16, BLOCK_K=256)),
        "gated": ({"res_ptr": "*fp32", "eps": "fp32"}, dict(fixed, MODE=2, BLOCK_B=8, BLOCK_N=4, BLOCK_K=256)),
    })
    if usage is None:
        pytest.skip("this Triton's compile API differs")
    for name, line in usage.items():
        assert "REG:" in line and "LOCAL:0" in line and "STACK:0" in line, f"{name}: {line}"
