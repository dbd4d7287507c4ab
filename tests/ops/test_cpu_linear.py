"""`mambakit.ops.cpu_linear`: 16-bit weights times a float32 input with float32 accumulation and output, against the
float64 product of the same (rounded) values, also for weights beyond float16's normal range, through the float16
pack and through the float32 copy of a small weight; NaN propagation;
repacking after an in-place update; when it applies."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.ops import cpu_linear as cl
from tests.conftest import rel_err

pytestmark = pytest.mark.skipif(not cl.fp32_accumulation_available(), reason="this torch has no fbgemm fp16 product")


@pytest.fixture(autouse=True, params=["fbgemm", "small"])
def path(request, monkeypatch):
    """Every test on both ways: the float16 pack (SMALL 0) and the float32 copy of a small weight (these all are)."""
    monkeypatch.setattr(cl, "SMALL", 0 if request.param == "fbgemm" else 1 << 18)
    return request.param


@pytest.fixture(autouse=True)
def _fp32_accumulation_on(monkeypatch):
    """These tests are of the fbgemm product (mambakit.ops.cpu_linear.ENABLED, the default), whatever the default."""
    monkeypatch.setattr(cl, "ENABLED", True)


def _ref(x, w, b=None):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,n_in,n_out", [(1, 37, 53), (3, 130, 9), (2, 1, 300)])
def test_matches_float64(wdtype, xdtype, batch, n_in, n_out):
    g = torch.Generator().manual_seed(batch * n_in + n_out)
    x = torch.randn(batch, n_in, generator=g).to(xdtype)
    w = (torch.randn(n_out, n_in, generator=g) * n_in ** -0.5).to(wdtype)
    b = torch.randn(n_out, generator=g).to(wdtype)
    out = cl.cpu_linear(x, w, b)
    assert out.dtype == torch.float32 and out.shape == (batch, n_out)
    # float32 accumulation of exactly representable products: float32 rounding only (a bf16 output would be ~3e-3)
    assert rel_err(out, _ref(x, w, b)) < 1e-6
    assert rel_err(cl.cpu_linear(x, w), _ref(x, w)) < 1e-6


def test_float32_input_is_not_rounded():
    w = torch.eye(4, dtype=torch.bfloat16)
    x = torch.tensor([[1 + 2 ** -20, -3.0e-6, 7.0e4, 1e-30]])
    assert torch.equal(cl.cpu_linear(x, w), x)


@pytest.mark.parametrize("scale", [1e-6, 1e-30, 1e5, 1e30])
def test_weights_beyond_float16s_normal_range(scale):
    """Rows of tiny or huge weights (float16 subnormals or overflow unscaled) are scaled into range, exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, generator=g)
    w = torch.randn(8, 16, generator=g)
    one_row = w.clone()
    one_row[2] *= scale
    for weight in (one_row.bfloat16(), (w * scale).bfloat16()):
        assert cl.packs_fp16(weight) == (cl.SMALL == 0)
        out = cl.cpu_linear(x, weight)
        assert out.dtype == torch.float32 and rel_err(out[:, 2], _ref(x, weight)[:, 2]) < 1e-6
        assert rel_err(out, _ref(x, weight)) < 1e-6


def test_nan_propagates():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 5, generator=g).bfloat16()
    x = torch.randn(1, 5, generator=g)
    x[0, 2] = float("nan")
    assert torch.isnan(cl.cpu_linear(x, w)).all()
    w[4, 1] = float("nan")
    assert not cl.packs_fp16(w)  # the plain product, which propagates it
    assert torch.isnan(cl.cpu_linear(torch.ones(1, 5), w)[0, 4])


def test_repacks_after_in_place_update():
    w = torch.ones(3, 4, dtype=torch.bfloat16)
    x = torch.ones(1, 4)
    assert torch.equal(cl.cpu_linear(x, w), torch.full((1, 3), 4.0))
    w.mul_(2)
    assert torch.equal(cl.cpu_linear(x, w), torch.full((1, 3), 8.0))
    with torch.no_grad():
        w.copy_(torch.full((3, 4), 0.5))
    assert torch.equal(cl.cpu_linear(x, w), torch.full((1, 3), 2.0))


def test_when_it_applies(monkeypatch):
    x = torch.randn(1, 4)
    w = torch.randn(3, 4).bfloat16()
    assert cl.use_cpu_linear(x, w) and cl.use_cpu_linear(x.bfloat16(), w.half())
    assert not cl.use_cpu_linear(x, w.float())  # float32 weights keep F.linear
    assert not cl.use_cpu_linear(x.double(), w)
    assert not cl.use_cpu_linear(x.requires_grad_(), w)  # autograd: F.linear records the graph
    with torch.no_grad():
        assert cl.use_cpu_linear(x, w)
    monkeypatch.setattr(cl, "ENABLED", False)
    assert not cl.use_cpu_linear(x.detach(), w)


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_split_linear_equals_the_float64_product(batch, monkeypatch):
    monkeypatch.setattr(cl, "SMALL", 1 << 18)
    g = torch.Generator().manual_seed(batch)
    w = torch.randn(2 * 1031, 300, generator=g)  # more than SMALL elements, an odd half
    b = torch.randn(2 * 1031, generator=g)
    x = torch.randn(batch, 300, generator=g)
    assert cl.use_split_linear(x, w)
    got = cl.split_linear(x, w, b)
    want = F.linear(x.double(), w.double(), b.double())
    assert got.shape == (batch, 2 * 1031) and got.dtype == torch.float32 and got.is_contiguous()
    assert (got.double() - want).norm() / want.norm() < 1e-6
    x[0, 0] = float("nan")  # a non-finite input reaches its own row only
    got = cl.split_linear(x, w, None)
    assert torch.isnan(got[0]).all() and torch.isfinite(got[1:]).all()


def test_split_linear_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(cl, "SMALL", 1 << 18)
    w = torch.randn(2 * 1031, 300)
    x = torch.randn(1, 300)
    assert not cl.use_split_linear(x, torch.randn(2 * 1031 + 1, 300))  # odd rows
    assert not cl.use_split_linear(x, torch.randn(64, 300))  # small: F.linear
    assert not cl.use_split_linear(torch.randn(cl.SPLIT_MAX_BATCH + 1, 300), w)  # prefill
    assert not cl.use_split_linear(x, w.t().contiguous().t())  # not contiguous
    assert not cl.use_split_linear(x.double(), w.double())
    assert not cl.use_split_linear(x.requires_grad_(), w)
    with torch.no_grad():
        assert cl.use_split_linear(x, w)


def test_linear_step_takes_the_split_product_for_float32(monkeypatch):
    monkeypatch.setattr(cl, "SMALL", 1 << 18)
    from mambakit.ops import mixer_step

    calls = []
    real = mixer_step.split_linear
    monkeypatch.setattr(mixer_step, "split_linear", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(2 * 1031, 300)
    x = torch.randn(2, 300)
    with torch.no_grad():
        got = mixer_step.linear_step(x, w)
    assert calls and torch.allclose(got, F.linear(x, w), rtol=1e-5, atol=1e-4)
