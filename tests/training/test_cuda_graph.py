"""GraphedStep: forward, loss and backward as one CUDA graph. On the GPU: the same loss and gradients as the eager
step on fresh batches (Mamba-1, Mamba-2 and Mamba-3 LMs under bf16 autocast, the plain and the fused loss), the
gradients overwritten per replay, an optimizer step between replays; everywhere: the clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.errors import MambaKitError
from mambakit.training.cuda_graph import GraphedStep
from tests.conftest import rel_err


def _loss_fn(model, fused: bool = False):
    def loss(x, y):
        if fused:  # chunked, no logits (mambakit.ops.loss): the trainer's loss
            return model(x, labels=y, return_logits=False).loss
        logits = model(x).logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    return loss


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA error")
def test_needs_cuda():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(MambaKitError, match="needs CUDA"):
        GraphedStep(lambda x: model(x).sum(), model.parameters(), (torch.zeros(1, 2),))


@pytest.mark.gpu
@pytest.mark.parametrize("ssm_cfg", [{}, {"layer": "Mamba2", "d_state": 64, "headdim": 32},
                                     {"layer": "Mamba3", "d_state": 32, "headdim": 32}],
                         ids=["mamba1", "mamba2", "mamba3"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain_loss", "fused_loss"])
def test_graphed_step_matches_eager(ssm_cfg, fused):
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=128, n_layer=2, vocab_size=96, ssm_cfg=ssm_cfg)
    model = MambaLMHeadModel(cfg, device="cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = _loss_fn(model, fused)
    ids = torch.randint(0, 96, (2, 257), device="cuda")
    step = GraphedStep(loss_fn, params, (ids[:, :-1], ids[:, 1:]), autocast_dtype=torch.bfloat16)
    opt = torch.optim.AdamW(params, lr=1e-3)
    for seed in (1, 2):
        batch = torch.randint(0, 96, (2, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        got = step(batch[:, :-1], batch[:, 1:]).clone()
        got_grads = [p.grad.clone() for p in params]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want = loss_fn(batch[:, :-1], batch[:, 1:])
        want.backward()
        assert torch.isfinite(got) and rel_err(got, want) < 1e-3
        for p, g in zip(params, got_grads):
            assert rel_err(g, p.grad) < 2e-2
        for p, g in zip(params, saved):  # back to the graph's gradient tensors, then an eager optimizer step
            p.grad = g
        opt.step()
    for p in params:
        p.grad = None
    with pytest.raises(MambaKitError, match="set_to_none"):
        step(ids[:, :-1], ids[:, 1:])


@pytest.mark.gpu
def test_graphed_step_refuses_other_shapes():
    model = torch.nn.Linear(8, 4).cuda()
    step = GraphedStep(lambda x: model(x).square().mean(), model.parameters(), (torch.randn(3, 8, device="cuda"),))
    with pytest.raises(MambaKitError, match=r"shape \(3, 8\)"):
        step(torch.randn(5, 8, device="cuda"))
    x = torch.randn(3, 8, device="cuda")
    loss = step(x)
    assert rel_err(loss, model(x).square().mean()) < 1e-5
