"""What applications call on the mixers: the dt transform (explicit, installed for a block, the deprecated
delta_hook), ssm_inputs -> scan -> finish equal to forward, the masked dt, and the gated norm's scale."""
from __future__ import annotations

import pytest
import torch

from mambakit.layers.dt_transform import DtTransformMixin
from mambakit.layers.mamba import Mamba
from mambakit.layers.mamba2 import Mamba2
from mambakit.layers.norm import RMSNormGated


def _layers():
    torch.manual_seed(0)
    return [Mamba(16, d_state=4).double(), Mamba2(16, d_state=4, headdim=8, chunk_size=8, ngroups=2).double()]


@pytest.mark.parametrize("layer", _layers(), ids=["mamba", "mamba2"])
def test_dt_transform_three_ways_agree(layer):
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    seen = []

    def double_dt(dt):
        seen.append(dt.shape)
        return dt * 2

    with torch.no_grad():
        plain = layer(x)
        explicit = layer(x, dt_transform=double_dt)
        with layer.transforming_dt(double_dt):
            installed = layer(x)
            assert layer.dt_transform is double_dt
        assert layer.dt_transform is None
        with pytest.warns(DeprecationWarning):
            layer.delta_hook = double_dt
        hooked = layer(x)
        layer.delta_hook = None
    time_first = (2, 9, layer.dt_size)
    assert seen == [time_first if layer.dt_time_dim == 1 else (2, layer.dt_size, 9)] * 3
    assert torch.equal(explicit, installed) and torch.equal(explicit, hooked)
    assert not torch.allclose(plain, explicit)
    assert isinstance(layer, DtTransformMixin)


@pytest.mark.parametrize("layer", _layers(), ids=["mamba", "mamba2"])
@pytest.mark.parametrize("masked", [False, True])
def test_inputs_scan_finish_is_forward(layer, masked):
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    mask = torch.tensor([[1] * 9, [0, 0] + [1] * 7]) if masked else None
    with torch.no_grad():
        s = layer.ssm_inputs(x, mask=mask)
        y, _ = layer.scan(s)
        out = layer.finish(y) if isinstance(layer, Mamba) else layer.finish(y.flatten(-2), s.z)
        assert torch.equal(out, layer(x, mask=mask))
    if masked:  # the one padding rule: the processed dt is exactly 0 at the pads
        delta = s.delta if isinstance(layer, Mamba) else s.dt
        pads = delta[1, :, :2] if isinstance(layer, Mamba) else delta[1, :2]
        assert torch.all(pads == 0) and bool((delta[0] > 0).all())


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_rms_scale_reproduces_the_gated_norm(norm_before_gate):
    torch.manual_seed(1)
    norm = RMSNormGated(12, group_size=4, norm_before_gate=norm_before_gate).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    y, z = torch.randn(3, 5, 12, dtype=torch.float64), torch.randn(3, 5, 12, dtype=torch.float64)
    silu_z = torch.nn.functional.silu(z)
    normed_input = y if norm_before_gate else y * silu_z
    out = normed_input * norm.rms_scale(y, z) * norm.weight
    if norm_before_gate:
        out = out * silu_z
    torch.testing.assert_close(out, norm(y, z), rtol=1e-12, atol=1e-12)
    assert norm.rms_scale(y, z, dtype=torch.float32).dtype == torch.float32
