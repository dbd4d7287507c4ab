"""The S4 mixer: conv and recurrent modes agree inside the block; prefill + steps equal one pass; in the LM."""
from __future__ import annotations

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.layers.s4 import S4
from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel
from tests.conftest import rel_err


@pytest.mark.parametrize("init,method", [("legs", "zoh"), ("lin", "bilinear"), ("real", "zoh")])
def test_modes_agree_and_continue(init, method):
    torch.manual_seed(0)
    m = S4(16, d_state=8, init=init, discretization=method).double()
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    conv = m(x)
    m.mode = "recurrent"
    assert rel_err(m(x), conv) <= 1e-8
    m.mode = "conv"
    state = m.allocate_state(2, dtype=torch.float64)
    parts = [m(x[:, :25], state=state)] + [m.step(x[:, t:t + 1], state) for t in range(25, 40)]
    assert rel_err(torch.cat(parts, 1), conv) <= 1e-8


def test_s4_as_lm_mixer_trains_a_step():
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=20, ssm_cfg={"layer": "S4", "d_state": 8}))
    ids = torch.randint(0, 20, (2, 30))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.backbone.layers[0].mixer.A_imag.grad is not None
    g = model.generate(ids[:, :5], 5, temperature=0)
    assert g.shape == (2, 10)


def test_bad_options():
    with pytest.raises(MambaKitError, match="discretization"):
        S4(8, discretization="euler")
    with pytest.raises(MambaKitError, match="seq_idx"):
        S4(8)(torch.randn(1, 3, 8), seq_idx=torch.zeros(1, 3, dtype=torch.long))


def test_every_parameter_goes_to_the_device_asked_for():
    """device= reaches the SSM parameters too (they used to stay on the CPU), and the CPU values stay the seeded
    ones."""
    m = S4(8, device="meta")
    assert {p.device.type for p in m.parameters()} == {"meta"}
    torch.manual_seed(3)
    a = S4(8)
    torch.manual_seed(3)
    b = S4(8, device="cpu")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
