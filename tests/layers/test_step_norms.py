"""The CPU decode step's norms in fewer calls (`mambakit.layers.step`): the gated RMSNorm and the add + RMSNorm against
the PyTorch reference (`mambakit.ops.norm.naive`) on fresh random inputs of awkward shapes, float64 and float32 with a
bfloat16 weight."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mambakit.layers.step import PreNorm, lean_rms_norm_gated, norm_project_step
from mambakit.ops.norm import add_rms_norm
from mambakit.ops.norm.naive import rms_norm_gated_torch
from tests.conftest import rel_err


@pytest.mark.parametrize("batch,d,group_size", [(3, 35, 7), (1, 24, 24), (2, 12, 4)])
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("dtype,wdtype", [(torch.float64, torch.float64), (torch.float32, torch.bfloat16)])
def test_lean_gated_norm_matches_reference(batch, d, group_size, norm_before_gate, dtype, wdtype):
    g = torch.Generator().manual_seed(batch * d + group_size + norm_before_gate)
    y, z = (torch.randn(batch, d, generator=g, dtype=dtype) * 3 for _ in range(2))
    w = torch.randn(d, generator=g).to(wdtype)
    ref = rms_norm_gated_torch(y, z, w, 1e-5, group_size, norm_before_gate)
    out = lean_rms_norm_gated(y, z, w, 1e-5, group_size, norm_before_gate)
    assert out.dtype == dtype
    assert rel_err(out, ref) < (1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("batch,with_residual", [(1, False), (3, True)])
def test_cpu_float32_add_norm_project_matches_reference(batch, with_residual):
    g = torch.Generator().manual_seed(batch)
    d, out_features = 37, 29
    lin = nn.Linear(d, out_features)
    x = torch.randn(batch, d, generator=g)
    residual = torch.randn(batch, d, generator=g) if with_residual else None
    w = torch.randn(d, generator=g)
    with torch.no_grad():
        out, res = norm_project_step(lin, x, PreNorm(residual, w, 1e-5, True))
        normed, ref_res = add_rms_norm(x, residual, w, 1e-5, True, backend="torch")
        ref = lin(normed)
    assert torch.equal(res, ref_res)
    assert rel_err(out, ref) < 1e-6
