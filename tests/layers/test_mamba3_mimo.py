"""The Mamba-3 block with MIMO (rank R): official names/shapes/packing/init, chunked prefill then steps, packed
sequences, gradients to every parameter, rank 1 == SISO (the step loop == forward tests are test_mamba3's, with
MIMO_CONFIGS)."""
from __future__ import annotations

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.layers.mamba3 import Mamba3
from tests.conftest import rel_err
from tests.layers.test_mamba3 import MIMO_CONFIGS, _layer

CONFIGS = MIMO_CONFIGS


def test_official_shapes_and_init():
    m = Mamba3(d_model=768, d_state=128, headdim=64, is_mimo=True, mimo_rank=4)
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == {"in_proj.weight": (2 * 1536 + 2 * 128 * 4 + 3 * 24 + 32, 768), "dt_bias": (24,),
                      "B_bias": (24, 4, 128), "C_bias": (24, 4, 128), "B_norm.weight": (128,),
                      "C_norm.weight": (128,), "mimo_x": (24, 4, 64), "mimo_z": (24, 4, 64), "mimo_o": (24, 4, 64),
                      "D": (24,), "out_proj.weight": (768, 1536)}
    assert torch.equal(m.mimo_x, torch.full((24, 4, 64), 0.25)) and torch.equal(m.mimo_z, torch.ones(24, 4, 64))
    assert torch.equal(m.mimo_o, torch.full((24, 4, 64), 0.25)) and torch.equal(m.B_bias, torch.ones(24, 4, 128))
    assert tuple(m.allocate_state(3).k.shape) == (3, 4, 24, 128)


def test_chunked_prefill_then_steps_and_packed():
    m = _layer(**CONFIGS[0])
    x = torch.randn(2, 25, 32, dtype=torch.float64)
    full = m(x)
    state = m.allocate_state(2, dtype=torch.float64)
    parts = [m(x[:, :11], state=state), m(x[:, 11:19], state=state)]
    parts += [m.step(x[:, t:t + 1], state) for t in range(19, 25)]
    assert rel_err(torch.cat(parts, 1), full) < 1e-10
    seq_idx = torch.zeros(2, 25, dtype=torch.long)
    seq_idx[:, 9:] = 1
    assert rel_err(m(x, seq_idx=seq_idx), torch.cat((m(x[:, :9]), m(x[:, 9:])), 1)) < 1e-10


def test_gradients_reach_every_parameter():
    m = _layer(dtype=torch.float32, **CONFIGS[2])
    m(torch.randn(2, 12, 32)).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_rank_one_equals_siso():
    siso = _layer(headdim=8)
    mimo = Mamba3(d_model=32, d_state=8, headdim=8, chunk_size=8, is_mimo=True, mimo_rank=1).double()
    missing = mimo.load_state_dict(siso.state_dict(), strict=False)
    assert sorted(missing.missing_keys) == ["mimo_o", "mimo_x", "mimo_z"] and not missing.unexpected_keys
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    assert rel_err(mimo(x), siso(x)) < 1e-12


def test_mask_refused():
    m = _layer(**CONFIGS[0])
    with pytest.raises(MambaKitError, match="mask"):
        m(torch.randn(1, 4, 32, dtype=torch.float64), mask=torch.ones(1, 4))


def test_scan_backend():  # "triton" reaches the kernels on CUDA only (the GPU test); elsewhere it is the torch form
    m = _layer(**CONFIGS[0])
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    want = m(x)
    for backend in ("torch", "triton", "ref"):
        m.scan_backend = backend
        assert rel_err(m(x), want) < 1e-10, backend
    with pytest.raises(MambaKitError, match="scan_backend"):
        Mamba3(d_model=32, d_state=8, headdim=8, is_mimo=True, scan_backend="cuda")
