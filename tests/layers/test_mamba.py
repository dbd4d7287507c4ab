"""The Mamba-1 block: official parameter names/shapes/init, state continuation, padding masks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mambakit.errors import MambaKitError
from mambakit.layers.mamba import Mamba
from tests.conftest import rel_err


def test_parameter_names_shapes_and_init():
    torch.manual_seed(0)
    m = Mamba(d_model=40, d_state=16, d_conv=4, expand=2)
    d_inner, dt_rank = 80, math.ceil(40 / 16)
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == {
        "A_log": (d_inner, 16), "D": (d_inner,), "in_proj.weight": (2 * d_inner, 40),
        "conv1d.weight": (d_inner, 1, 4), "conv1d.bias": (d_inner,), "x_proj.weight": (dt_rank + 32, d_inner),
        "dt_proj.weight": (d_inner, dt_rank), "dt_proj.bias": (d_inner,), "out_proj.weight": (40, d_inner),
    }
    assert torch.allclose(-torch.exp(m.A_log), -torch.arange(1, 17.0).expand(d_inner, 16))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert m.dt_proj.weight.abs().max() <= dt_rank ** -0.5
    assert torch.equal(m.D, torch.ones(d_inner))


def test_forward_continuing_from_state_equals_one_pass():
    torch.manual_seed(1)
    m = Mamba(d_model=16, d_state=4).double()
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    full = m(x)
    state = m.allocate_state(2, dtype=torch.float64)
    parts = [m(x[:, :9], state=state), m(x[:, 9:10], state=state), m(x[:, 10:17], state=state)]
    parts += [m.step(x[:, t:t + 1], state) for t in range(17, 23)]
    assert rel_err(torch.cat(parts, 1), full) < 1e-12


def test_padding_mask_leaves_state_untouched():
    torch.manual_seed(2)
    m = Mamba(d_model=16, d_state=4).double()
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    alone_state = m.allocate_state(1, dtype=torch.float64)
    alone = m(x, state=alone_state)
    for pad_left in (True, False):
        pad = torch.randn(1, 5, 16, dtype=torch.float64)
        xp = torch.cat([pad, x], 1) if pad_left else torch.cat([x, pad], 1)
        mask = torch.ones(1, 12)
        if pad_left:
            mask[:, :5] = 0
        else:
            mask[:, 7:] = 0
        st = m.allocate_state(1, dtype=torch.float64)
        out = m(xp, state=st, mask=mask)
        real = out[:, 5:] if pad_left else out[:, :7]
        assert rel_err(real, alone) < 1e-12
        assert rel_err(st.ssm, alone_state.ssm) < 1e-12 and rel_err(st.conv, alone_state.conv) < 1e-12


@pytest.mark.parametrize("kwargs,msg", [(dict(d_model=0), "d_model"), (dict(d_model=8, d_state=-1), "d_state"),
                                        (dict(d_model=8, dt_init="zeros"), "dt_init"),
                                        (dict(d_model=8, dt_min=0.5, dt_max=0.1), "dt_min")])
def test_bad_config(kwargs, msg):
    with pytest.raises(MambaKitError, match=msg):
        Mamba(**kwargs)
