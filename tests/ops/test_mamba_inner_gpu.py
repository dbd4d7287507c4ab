"""GPU: the fused Mamba-1 inner path and the fused residual add + RMSNorm, compiled for the device, against float64
compositions: float32 (1e-5) and bfloat16 (1e-2) at a 130M-like shape (d_inner 1536 split 2 x 768 here to stay
small), every gradient; and a Mamba-1 LM training step under bf16 autocast, fused vs the composition."""
from __future__ import annotations

import pytest
import torch

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.ops.mamba_inner import mamba_inner
from mambakit.ops.norm import add_rms_norm
from tests.conftest import rel_err
from tests.ops.test_mamba_inner import make_inner

pytestmark = pytest.mark.gpu


def _grads(xz, kw, backend, dtype):
    xzc = xz.detach().to("cuda", dtype).requires_grad_()
    kwc = {k: (v.detach().to("cuda", dtype if k not in ("A", "D", "delta_bias") else torch.float32)
               .requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if dtype == torch.float64:
        kwc = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v)
               for k, v in kwc.items()}
    out = mamba_inner(xzc.transpose(1, 2), **kwc, backend=backend)
    w = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda", dtype=torch.float64)
    leaves = [xzc] + [v for v in kwc.values() if isinstance(v, torch.Tensor)]
    return out, torch.autograd.grad((out.double() * w).sum(), leaves)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_inner_cuda(dtype, tol):
    xz, kw = make_inner(batch=2, d_inner=768, d_state=16, rank=48, d_model=384, seqlen=333, seed=4)
    ref, ref_grads = _grads(xz, kw, "ref", torch.float64)
    out, grads = _grads(xz, kw, "triton", dtype)
    assert rel_err(out, ref) < tol
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert rel_err(a, b) < tol * 3, i


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_add_norm_cuda(dtype, tol):
    g = torch.Generator("cuda").manual_seed(0)
    h = torch.randn(4, 257, 768, generator=g, device="cuda").to(dtype).requires_grad_()
    r = torch.randn(4, 257, 768, generator=g, device="cuda").requires_grad_()
    w = (1 + 0.1 * torch.randn(768, generator=g, device="cuda")).requires_grad_()
    outs = {}
    for backend in ("triton", "torch"):
        hh, rr, ww = (t.detach().clone().requires_grad_() for t in (h, r, w))
        if backend == "torch":
            hh, rr, ww = (t.detach().double().requires_grad_() for t in (h, r, w))
        n, res = add_rms_norm(hh, rr, ww, 1e-5, True, backend=backend)
        (n.double().sin().sum() + res.double().cos().sum()).backward()
        outs[backend] = (n, res, hh.grad, rr.grad, ww.grad)
    for a, b in zip(outs["triton"], outs["torch"]):
        assert rel_err(a, b) < tol


def test_lm_training_step_fused_equals_composition_bf16():
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=256, n_layer=3, vocab_size=300)
    fused = MambaLMHeadModel(cfg, device="cuda")
    ref = MambaLMHeadModel(MambaConfig(d_model=256, n_layer=3, vocab_size=300, ssm_cfg={"scan_backend": "torch"}),
                           device="cuda")
    ref.load_state_dict(fused.state_dict())
    ids = torch.randint(0, 300, (2, 200), device="cuda")
    losses = []
    for model in (fused, ref):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach().float())
    assert abs(losses[0] - losses[1]) < 2e-2
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 5e-2, name
