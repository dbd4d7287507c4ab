"""Mamba's bcdt_rms option (Falcon-Mamba's weightless RMSNorm on dt_low, B and C): the decoding step's PyTorch
paths against each other and against the forward, and the options' checks."""
from __future__ import annotations

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.layers.mamba import Mamba
from mambakit.ops.mixer_step import mamba1_step, weightless_rms
from tests.conftest import rel_err


def _layer(bcdt_rms: bool, dtype=torch.float64) -> Mamba:
    torch.manual_seed(0)
    layer = Mamba(24, d_state=6, d_conv=3, dt_rank=4, bcdt_rms=bcdt_rms, bcdt_rms_eps=1e-4, dtype=dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return layer.to(dtype).eval()


def test_weightless_rms_matches_its_definition():
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    want = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6)
    assert rel_err(weightless_rms(x, 1e-6), want) <= 1e-12
    assert weightless_rms(x.to(torch.bfloat16), 1e-6).dtype == torch.bfloat16


@torch.no_grad()
def test_step_torch_and_ref_agree_and_the_norm_matters():
    layer = _layer(True)
    batch, d = 2, layer.d_inner
    g = torch.Generator().manual_seed(1)
    xz = torch.randn(batch, 2 * d, generator=g, dtype=torch.float64)
    conv = torch.randn(batch, d, layer.d_conv, generator=g, dtype=torch.float64)
    ssm = torch.randn(batch, d, layer.d_state, generator=g, dtype=torch.float64)
    args = (layer.conv1d.weight.squeeze(1), layer.conv1d.bias, layer.x_proj.weight, layer.dt_proj.weight,
            layer.dt_proj.bias, layer.A_log, layer.D)
    outs, states = [], []
    for backend, eps in (("torch", 1e-4), ("ref", 1e-4), ("torch", None)):
        c, s = conv.clone(), ssm.clone()
        outs.append(mamba1_step(xz, c, s, *args, backend=backend, bcdt_rms_eps=eps))
        states.append(s)
    assert rel_err(outs[0], outs[1]) <= 1e-12 and rel_err(states[0], states[1]) <= 1e-12
    assert rel_err(outs[0], outs[2]) > 1e-3  # the option changes the result
    with pytest.raises(MambaKitError, match="bcdt_rms_eps"):
        mamba1_step(xz, conv.float(), ssm.float(), *(a.float() for a in args), backend="triton", bcdt_rms_eps=1e-4)
    with pytest.raises(MambaKitError, match="bcdt_rms_eps must be a positive number or None, got 0"):
        mamba1_step(xz, conv, ssm, *args, bcdt_rms_eps=0)


@pytest.mark.parametrize("bcdt_rms", [True, False])
@torch.no_grad()
def test_step_loop_equals_forward(bcdt_rms):
    layer = _layer(bcdt_rms)
    x = torch.randn(2, 9, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    state = layer.allocate_state(2)
    steps = torch.cat([layer.step(x[:, t:t + 1], state) for t in range(x.shape[1])], dim=1)
    assert rel_err(steps, layer(x)) <= 1e-10


def test_option_checks():
    with pytest.raises(MambaKitError, match="bcdt_rms must be True or False, got 1"):
        Mamba(16, bcdt_rms=1)
    with pytest.raises(MambaKitError, match="bcdt_rms_eps must be positive, got 0"):
        Mamba(16, bcdt_rms=True, bcdt_rms_eps=0)


@torch.no_grad()
def test_learned_weights_forward_and_step():
    """bcdt_rms_weight (Jamba): the forward equals the step loop, both paths of the step agree, and the weights
    multiply the normalised dt_low / B / C."""
    torch.manual_seed(0)
    layer = Mamba(24, d_state=6, d_conv=3, dt_rank=5, bcdt_rms=True, bcdt_rms_eps=1e-4, bcdt_rms_weight=True,
                  dtype=torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    layer.eval()
    assert [tuple(w.shape) for w in layer.bcdt_weights] == [(5,), (6,), (6,)]
    x = torch.randn(2, 9, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    full = layer(x)
    for backend in ("torch", "ref"):
        state = layer.allocate_state(2)
        xs = [layer.in_proj(x[:, t]) for t in range(x.shape[1])]
        ys = [mamba1_step(xz, state.conv, state.ssm, layer.conv1d.weight.squeeze(1), layer.conv1d.bias,
                          layer.x_proj.weight, layer.dt_proj.weight, layer.dt_proj.bias, layer.A_log, layer.D,
                          backend=backend, bcdt_rms_eps=1e-4, bcdt_weights=layer.bcdt_weights) for xz in xs]
        assert rel_err(layer.out_proj(torch.stack(ys, 1)), full) <= 1e-10
    weightless = Mamba(24, d_state=6, d_conv=3, dt_rank=5, bcdt_rms=True, bcdt_rms_eps=1e-4, dtype=torch.float64)
    weightless.load_state_dict({k: v for k, v in layer.state_dict().items() if "norm_weight" not in k})
    assert rel_err(weightless.eval()(x), full) > 1e-3
    with pytest.raises(MambaKitError, match="bcdt_rms_weight must be True"):
        Mamba(16, bcdt_rms_weight=True)
    with pytest.raises(MambaKitError, match="bcdt_weights dt must have shape"):
        state = layer.allocate_state(2)
        mamba1_step(xs[0], state.conv, state.ssm, layer.conv1d.weight.squeeze(1), layer.conv1d.bias,
                    layer.x_proj.weight, layer.dt_proj.weight, layer.dt_proj.bias, layer.A_log, layer.D,
                    bcdt_rms_eps=1e-4, bcdt_weights=(layer.B_norm_weight,) * 3)
