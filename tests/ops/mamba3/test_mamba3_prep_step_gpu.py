"""GPU: the fused Mamba-3 SISO prep + decoding step (`mamba3_prep_step`, what a SISO layer's step runs on CUDA) at
the 130M heads (24 heads x headdim 64, d_state 128, rope fraction 0.5 / 1.0, both A activations, gate on / off) with
a bfloat16 in_proj row and parameters (float32 states), against the float64 composition fed the same rounded values,
over several steps; a bf16 Mamba-3 layer's step loop (with and without pre_norm, is_outproj_norm on / off) against
its unfused PyTorch step, inside a CUDA graph too; and "auto" running the kernel."""
from __future__ import annotations

import math

import pytest
import torch

from mambakit.layers.step import PreNorm
from mambakit.ops.mamba3 import mamba3_step
from mambakit.ops.mamba3.prep_step import mamba3_prep_step
from tests.conftest import rel_err
from tests.ops.mamba3.helpers import assert_cuda_states, graphed_step_loop, spy

pytestmark = pytest.mark.gpu

H, P, N = 24, 64, 128


def _params(g, dtype):
    def r(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to("cuda", dtype)
    return (r(H, scale=0.5, shift=-3.0), r(N, scale=0.3, shift=1.0), r(N, scale=0.3, shift=1.0), r(H, N), r(H, N),
            r(H))


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("n_angles", [32, 64])
@pytest.mark.parametrize("act,gate", [("heavy_tail", True), ("softplus", False)])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_prep_step_cuda_matches_float64(batch, n_angles, act, gate, backend):
    g = torch.Generator().manual_seed(batch + n_angles)
    params = _params(g, torch.bfloat16)
    st = (torch.rand(batch, H, n_angles, generator=g) * 2 * math.pi, torch.randn(batch, H, P, N, generator=g),
          torch.randn(batch, H, N, generator=g), torch.randn(batch, H, P, generator=g))
    st64, st_c = tuple(s.double() for s in st), tuple(s.cuda() for s in st)
    kw = dict(nheads=H, ngroups=1, B_eps=1e-5, C_eps=1e-5, A_floor=1e-4, A_activation=act, gate=gate)
    width = 2 * H * P + 2 * N + 3 * H + n_angles
    for _ in range(3):
        row = torch.randn(batch, width, generator=g).to("cuda", torch.bfloat16)
        with torch.no_grad():
            out = mamba3_prep_step(st_c, row, *params, **kw, backend=backend)
        ref = mamba3_prep_step(st64, row.double().cpu(), *(p.double().cpu() for p in params), **kw, backend="torch")
        torch.cuda.synchronize()
        assert out.dtype == torch.bfloat16 and rel_err(out.cpu(), ref) < 1e-2
        assert_cuda_states(st_c, st64)


def test_layer_step_runs_the_kernel_on_cuda(monkeypatch):
    import mambakit.ops.mamba3.triton_prep_step as kernels
    from mambakit.layers.mamba3 import Mamba3

    calls = spy(monkeypatch, kernels, "mamba3_prep_step_triton")
    m = Mamba3(d_model=768, d_state=N, headdim=P).to("cuda", torch.bfloat16)
    with torch.no_grad():
        m.step(torch.randn(2, 768, device="cuda", dtype=torch.bfloat16), m.allocate_state(2))
    assert calls == [1]


def _loop(m, x, state, weight):
    """Steps over x (batch, seqlen, d_model); with weight, through pre_norm (the residual fed back)."""
    outs, residual = [], None
    for t in range(x.shape[1]):
        if weight is None:
            outs.append(m.step(x[:, t], state))
        else:
            out, residual = m.step(x[:, t], state, pre_norm=PreNorm(residual, weight, 1e-5, True))
            outs.append(out)
    return torch.stack(outs, 1)


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("kwargs", [dict(), dict(rope_fraction=1.0, is_outproj_norm=True, A_activation="softplus")])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_bf16_layer_step_loop_fused_equals_unfused_and_graphs(batch, kwargs, pre_norm, monkeypatch):
    import mambakit.layers.mamba3 as layer_module
    from mambakit.layers.mamba3 import Mamba3

    torch.manual_seed(0)
    m = Mamba3(d_model=768, d_state=N, headdim=P, **kwargs).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for p in (m.B_bias, m.C_bias, m.D, m.B_norm.weight, m.C_norm.weight):
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(batch, 10, 768, device="cuda", dtype=torch.bfloat16)
    weight = torch.rand(768, device="cuda", dtype=torch.bfloat16) + 0.5 if pre_norm else None
    with torch.no_grad():
        state = m.allocate_state(batch)
        fused = _loop(m, x, state, weight)
        with monkeypatch.context() as mp:
            mp.setattr(layer_module, "prep_step_fits", lambda *a, **k: False)
            mp.setattr(layer_module, "mamba3_step", lambda *a, **k: mamba3_step(*a, **k, backend="torch"))
            ref_state = m.allocate_state(batch)
            ref = _loop(m, x, ref_state, weight)
        assert rel_err(fused, ref) < 2e-2  # the unfused prep rounds the normed B and C to bf16, the kernel does not
        for a, b in zip(state.parts()[1:], ref_state.parts()[1:]):
            assert rel_err(a, b) < 1e-2
        if weight is None:
            assert rel_err(graphed_step_loop(m, x), fused) < 1e-2
