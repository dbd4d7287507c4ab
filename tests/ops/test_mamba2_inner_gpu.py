"""GPU: the fused Mamba-2 inner path compiled for the device against the float64 composition with the recurrence:
float32 (1e-5) and bfloat16 (1e-2) at a 130M-like head shape, every gradient; and a Mamba-2 LM training step under
bf16 autocast, fused vs the unfused layer path."""
from __future__ import annotations

import pytest
import torch

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.layers.mamba2 import Mamba2
from mambakit.ops.mamba2_inner import mamba2_inner
from tests.conftest import rel_err
from tests.ops.test_mamba2_inner import make_inner2

pytestmark = pytest.mark.gpu

_FP32_ARGS = ("A", "D", "dt_bias", "norm_weight")


def _grads(zxbcdt, kw, dims, backend, dtype, **extra):
    zc = zxbcdt.detach().to("cuda", dtype).requires_grad_()
    kwc = {k: (v.detach().to("cuda", torch.float32 if (k in _FP32_ARGS and dtype != torch.float64) else dtype)
               .requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = mamba2_inner(zc, **kwc, **dims, chunk_size=64, backend=backend, **extra)
    w = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda", dtype=torch.float64)
    leaves = [zc] + [v for v in kwc.values() if isinstance(v, torch.Tensor)]
    return out, torch.autograd.grad((out.double() * w).sum(), leaves)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("seq", [False, True])
def test_fused_inner2_cuda(dtype, tol, seq):
    zxbcdt, kw, dims = make_inner2(batch=2, seqlen=333, nheads=8, headdim=64, ngroups=1, d_state=128, d_model=256,
                                   seed=4)
    extra = {}
    if seq:
        seq_idx = torch.zeros(2, 333, dtype=torch.int32, device="cuda")
        seq_idx[:, 100:] = 1
        seq_idx[1, :7] = -1
        extra["seq_idx"] = seq_idx
    ref, ref_grads = _grads(zxbcdt, kw, dims, "ref", torch.float64, **extra)
    out, grads = _grads(zxbcdt, kw, dims, "triton", dtype, **extra)
    assert rel_err(out, ref) < tol
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert rel_err(a, b) < tol * 3, i


def test_lm_training_step_fused_equals_unfused_bf16(monkeypatch):
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=256, n_layer=3, vocab_size=300, ssm_cfg={"layer": "Mamba2", "d_state": 64})
    fused = MambaLMHeadModel(cfg, device="cuda")
    ids = torch.randint(0, 300, (2, 200), device="cuda")
    grads, losses = [], []
    for use_fused in (True, False):
        if not use_fused:
            monkeypatch.setattr(Mamba2, "_fused_inner_ok", lambda self, h, t: False)
        fused.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fused(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach().float())
        grads.append({n: p.grad.clone() for n, p in fused.named_parameters()})
    assert abs(losses[0] - losses[1]) < 2e-2
    for name, g in grads[0].items():
        assert rel_err(g, grads[1][name]) < 5e-2, name
