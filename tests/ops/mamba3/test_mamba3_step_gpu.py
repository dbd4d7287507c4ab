"""GPU: the fused Mamba-3 SISO decoding step (`mamba3_step`, backend "triton" and what "auto" runs on CUDA) at the
130M heads (24 heads x headdim 64, d_state 128, rope fraction 0.5 and 1.0) in float32 and with bfloat16 activations
(float32 states), against the PyTorch step in float64 fed the same rounded inputs, over several steps; and a bf16
Mamba-3 layer's step loop through "auto" against its PyTorch step loop, inside a CUDA graph too."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from mambakit.ops.mamba3 import mamba3_step
from tests.conftest import rel_err
from tests.ops.mamba3.helpers import assert_cuda_states, graphed_step_loop, spy

pytestmark = pytest.mark.gpu


def _inputs(g, batch, nheads, headdim, d_state, n_angles):
    def r(*s, scale=1.0):
        return torch.randn(*s, generator=g) * scale
    DT = torch.nn.functional.softplus(r(batch, nheads) - 2)
    return dict(Q=r(batch, 1, d_state), K=r(batch, 1, d_state), V=r(batch, nheads, headdim),
                ADT=-torch.rand(batch, nheads, generator=g) * DT, DT=DT, Trap=r(batch, nheads),
                Q_bias=r(nheads, d_state), K_bias=r(nheads, d_state), Angles=r(batch, nheads, n_angles, scale=2.0),
                D=r(nheads), Z=r(batch, nheads, headdim))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("n_angles", [32, 64])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_step_cuda_matches_float64(dtype, tol, batch, n_angles, backend):
    nheads, headdim, d_state = 24, 64, 128
    g = torch.Generator().manual_seed(batch + n_angles)
    st = (torch.rand(batch, nheads, n_angles, generator=g) * 2 * math.pi,
          torch.randn(batch, nheads, headdim, d_state, generator=g), torch.randn(batch, nheads, d_state, generator=g),
          torch.randn(batch, nheads, headdim, generator=g))
    st64, st_c = tuple(s.double() for s in st), tuple(s.cuda() for s in st)
    for _ in range(3):
        kw = _inputs(g, batch, nheads, headdim, d_state, n_angles)
        # the activations in dtype, dt / A*dt / angles / biases / D in float32, as the layer hands them over
        kw_c = {k: v.to("cuda", dtype if k in ("Q", "K", "V", "Z", "Trap") else torch.float32) for k, v in kw.items()}
        ref = mamba3_step(st64, **{k: v.double().cpu() for k, v in kw_c.items()}, backend="torch")
        out = mamba3_step(st_c, **kw_c, backend=backend)
        torch.cuda.synchronize()
        assert out.dtype == dtype and rel_err(out.cpu(), ref) < tol
        assert_cuda_states(st_c, st64)


def test_auto_runs_the_kernel_on_cuda(monkeypatch):
    import mambakit.ops.mamba3.triton_step as triton_step

    calls = spy(monkeypatch, triton_step, "mamba3_step_triton")
    g = torch.Generator().manual_seed(0)
    kw = {k: v.cuda() for k, v in _inputs(g, 2, 24, 64, 128, 32).items()}
    st = (torch.zeros(2, 24, 32, device="cuda"), torch.zeros(2, 24, 64, 128, device="cuda"),
          torch.zeros(2, 24, 128, device="cuda"), torch.zeros(2, 24, 64, device="cuda"))
    with torch.no_grad():
        mamba3_step(st, **kw)
    assert calls == [1]


@pytest.mark.parametrize("rope_fraction", [0.5, 1.0])
def test_bf16_layer_step_loop_auto_equals_torch_and_graphs(rope_fraction, monkeypatch):
    import mambakit.layers.mamba3 as layer_module
    from mambakit.layers.mamba3 import Mamba3

    torch.manual_seed(0)
    m = Mamba3(d_model=768, d_state=128, headdim=64, rope_fraction=rope_fraction).to("cuda", torch.bfloat16)
    x = torch.randn(4, 10, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        state = m.allocate_state(4)
        fused = torch.stack([m.step(x[:, t], state) for t in range(10)], 1)
        with monkeypatch.context() as mp:
            mp.setattr(layer_module, "mamba3_step", lambda *a, **k: mamba3_step(*a, **k, backend="torch"))
            mp.setattr(layer_module, "prep_step_fits", lambda *a, **k: False)  # the unfused prep too
            ref_state = m.allocate_state(4)
            ref = torch.stack([m.step(x[:, t], ref_state) for t in range(10)], 1)
            # float32 weights and input: what both bf16 loops approximate
            m32 = copy.deepcopy(m).float()
            st32 = m32.allocate_state(4)
            out32 = torch.stack([m32.step(x[:, t].float(), st32) for t in range(10)], 1)
        assert rel_err(fused, ref) < 1e-2 and rel_err(fused, out32) < 1e-2
        # the fused prep computes B/C norms, dt and A dt in float32 where the PyTorch prep rounds them to bf16:
        # its states are as close to float32's as the PyTorch loop's (or closer), not bit-equal to them
        for a, b, c in zip(state.parts(), ref_state.parts(), st32.parts()):
            assert rel_err(a, b) < 5e-3
            assert rel_err(a, c) <= max(1e-3, 1.25 * rel_err(b, c))
        assert rel_err(graphed_step_loop(m, x), fused) < 1e-2
