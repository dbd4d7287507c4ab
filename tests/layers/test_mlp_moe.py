"""The hybrids' feed-forward layers: MLP (gated, plain, packed) and TopKMoE / SharedExpertMoE against simple float64
references (every expert computed for every token), outputs and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.errors import MambaKitError
from mambakit.layers.mlp import ACTIVATIONS, MLP
from mambakit.layers.moe import SharedExpertMoE, TopKMoE
from tests.conftest import rel_err


@pytest.mark.parametrize("gated,packed,act", [(True, False, "silu"), (False, False, "relu2"), (True, True, "gelu")])
def test_mlp_variants(gated, packed, act):
    torch.manual_seed(0)
    m = MLP(12, 20, activation=act, gated=gated, packed=packed, bias=True).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    f = ACTIVATIONS[act]
    if packed:
        gate, up = F.linear(x, m.gate_up_proj.weight, m.gate_up_proj.bias).chunk(2, dim=-1)
        want = m.down_proj(f(gate) * up)
    elif gated:
        want = m.down_proj(f(m.gate_proj(x)) * m.up_proj(x))
    else:
        want = m.down_proj(f(m.up_proj(x)))
    assert rel_err(m(x), want) < 1e-14
    assert rel_err(ACTIVATIONS["relu2"](torch.tensor([-2.0, 3.0])), torch.tensor([0.0, 9.0])) == 0


def dense_moe(m: TopKMoE, x):
    """Every expert on every token, weighted by the softmax over the top-k router logits (zero elsewhere)."""
    flat = x.reshape(-1, x.shape[-1])
    logits = m.router(flat)
    top, index = logits.topk(m.top_k, dim=-1)
    weights = torch.zeros_like(logits).scatter(1, index, torch.softmax(top, dim=-1))
    gate, up = torch.einsum("td,eid->tei", flat, m.gate_up_proj).chunk(2, dim=-1)
    y = torch.einsum("tei,edi->ted", m.act(gate) * up, m.down_proj)
    return (weights[..., None] * y).sum(1).view_as(x)


@pytest.mark.parametrize("experts,top_k", [(4, 2), (5, 1), (3, 3)])
def test_top_k_moe_matches_dense_reference(experts, top_k):
    torch.manual_seed(experts)
    m = TopKMoE(10, 6, experts, top_k).double()
    with torch.no_grad():
        m.gate_up_proj.normal_()
        m.down_proj.normal_()
    x = torch.randn(3, 7, 10, dtype=torch.float64, requires_grad=True)
    out, ref = m(x), dense_moe(m, x)
    assert rel_err(out, ref) < 1e-12
    g = torch.randn_like(out)
    params = [x, m.router.weight, m.gate_up_proj, m.down_proj]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        assert rel_err(a, b) < 1e-10


def test_per_expert_softmax_topk_moe_matches_dense_reference():
    """Jamba's form: softmax over every router logit, the top-k probabilities unrenormalised, one MLP per expert."""
    torch.manual_seed(7)
    m = TopKMoE(10, 6, 5, 2, routing="softmax_topk", per_expert=True).double()
    x = torch.randn(3, 7, 10, dtype=torch.float64, requires_grad=True)
    flat = x.reshape(-1, 10)
    probs = torch.softmax(m.router(flat), dim=-1)
    top, index = probs.topk(2, dim=-1)
    weights = torch.zeros_like(probs).scatter(1, index, top)
    ref = sum(weights[:, e, None] * m.experts[e](flat) for e in range(5)).view_as(x)
    out = m(x)
    assert rel_err(out, ref) < 1e-12 and rel_err(weights.sum(-1), torch.ones(21, dtype=torch.float64)) > 1e-3
    g = torch.randn_like(out)
    params = [x, m.router.weight, m.experts[0].gate_proj.weight, m.experts[4].down_proj.weight]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        assert rel_err(a, b) < 1e-10
    with pytest.raises(MambaKitError, match="routing must be one of"):
        TopKMoE(8, 4, 3, 2, routing="sinkhorn")


def test_shared_expert_moe_adds_the_shared_mlp():
    torch.manual_seed(3)
    m = SharedExpertMoE(8, dict(d_intermediate=4, num_experts=3, top_k=2), dict(d_intermediate=5, packed=True))
    x = torch.randn(2, 4, 8)
    assert rel_err(m(x), m.moe(x) + m.shared(x)) == 0


def test_bad_moe_and_mlp_arguments():
    with pytest.raises(MambaKitError, match="top_k=4 must be <= num_experts=3"):
        TopKMoE(8, 4, 3, 4)
    with pytest.raises(MambaKitError, match="activation"):
        MLP(8, 4, activation="swish")
    with pytest.raises(MambaKitError, match="packed=True needs gated=True"):
        MLP(8, 4, gated=False, packed=True)
