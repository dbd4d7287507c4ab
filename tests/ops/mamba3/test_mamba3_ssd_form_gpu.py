"""GPU: the Mamba-3 layer's scan_backend "auto" reaching the SSD form (mambakit.ops.mamba3.ssd_form) on CUDA; its
forward and gradients against the chunked form are in test_mamba3_triton_gpu (backend "ssd")."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import rel_err

pytestmark = pytest.mark.gpu


def test_layer_auto_routes_to_the_ssd_form_on_cuda(monkeypatch):
    import mambakit.ops.mamba3.ssd_form as ssd_form
    from mambakit.layers.mamba3 import Mamba3

    calls = []
    real = ssd_form.mamba3_ssd
    monkeypatch.setattr(ssd_form, "mamba3_ssd", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    layer = Mamba3(64, d_state=32, headdim=16, chunk_size=16).cuda()
    x = torch.randn(2, 50, 64, device="cuda")
    got = layer(x)
    layer.scan_backend = "torch"
    assert calls and rel_err(got, layer(x)) < 1e-4
