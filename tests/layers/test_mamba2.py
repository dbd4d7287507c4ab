"""The Mamba-2 block: official names/shapes/packing, continuation from a state, padding masks, config errors."""
from __future__ import annotations

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.layers.mamba2 import Mamba2
from tests.conftest import rel_err


def test_official_shapes_130m_like():
    m = Mamba2(d_model=768, d_state=128, headdim=64)
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes["in_proj.weight"] == (3352, 768)
    assert shapes["conv1d.weight"] == (1792, 1, 4)
    assert shapes["dt_bias"] == shapes["A_log"] == shapes["D"] == (24,)
    assert shapes["norm.weight"] == (1536,) and shapes["out_proj.weight"] == (768, 1536)
    A = torch.exp(m.A_log)
    assert A.min() >= 1 and A.max() <= 16


@pytest.mark.parametrize("kwargs", [dict(), dict(ngroups=2, D_has_hdim=True), dict(rmsnorm=False),
                                    dict(norm_before_gate=True, dt_limit=(0.01, 0.5))])
def test_continuation_and_steps_equal_one_pass(kwargs):
    torch.manual_seed(0)
    m = Mamba2(d_model=32, d_state=8, headdim=16, chunk_size=8, **kwargs).double()
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    full = m(x)
    state = m.allocate_state(2, dtype=torch.float64)
    parts = [m(x[:, :11], state=state), m(x[:, 11:12], state=state), m(x[:, 12:21], state=state)]
    parts += [m.step(x[:, t:t + 1], state) for t in range(21, 29)]
    assert rel_err(torch.cat(parts, 1), full) < 1e-12


def test_padding_mask_leaves_state_untouched():
    torch.manual_seed(1)
    m = Mamba2(d_model=32, d_state=8, headdim=16, chunk_size=4, dt_limit=(0.05, 1.0)).double()
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    alone_state = m.allocate_state(1, dtype=torch.float64)
    alone = m(x, state=alone_state)
    xp = torch.cat([torch.randn(1, 3, 32, dtype=torch.float64), x], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    state = m.allocate_state(1, dtype=torch.float64)
    out = m(xp, state=state, mask=mask)
    assert rel_err(out[:, 3:], alone) < 1e-12
    assert rel_err(state.ssm, alone_state.ssm) < 1e-12 and rel_err(state.conv, alone_state.conv) < 1e-12


@pytest.mark.parametrize("kwargs,msg", [(dict(d_model=30, headdim=16), "divisible by headdim"),
                                        (dict(d_model=32, headdim=16, ngroups=3), "divisible by ngroups"),
                                        (dict(d_model=32, headdim=16, chunk_size=0), "chunk_size"),
                                        (dict(d_model=32, headdim=16, A_init_range=(0, 4)), "A_init_range")])
def test_invalid_configurations(kwargs, msg):
    with pytest.raises(MambaKitError, match=msg):
        Mamba2(**kwargs)


def test_step_with_the_norm_inside_equals_the_separate_norm(monkeypatch):
    """The step's wiring when the gated norm runs inside the mixer step (`mixer_step.M2_NORM_IN_STEP`; here the
    PyTorch composition behind `mamba2_step(norm=...)`): same output and states as the norm after the step."""
    import torch

    from mambakit.layers.mamba2 import Mamba2

    torch.manual_seed(0)
    layer = Mamba2(d_model=32, d_state=8, headdim=8, ngroups=2).eval()
    h = torch.randn(3, 1, 32)
    states = [layer.allocate_state(3) for _ in range(2)]
    for s in states:
        s.conv.normal_()
        s.ssm.normal_()
    states[1].conv.copy_(states[0].conv)
    states[1].ssm.copy_(states[0].ssm)
    with torch.no_grad():
        ref = layer.step(h, states[0])
        monkeypatch.setattr(Mamba2, "_norm_in_step", lambda self, zxbcdt: True)
        out = layer.step(h, states[1])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(states[1].ssm, states[0].ssm, rtol=0, atol=0)
