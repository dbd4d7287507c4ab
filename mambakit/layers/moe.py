"""Mixture-of-experts feed-forward layers, routed per token as transformers' Granite-MoE models do.

`TopKMoE`: router logits r = W_router x (num_experts), the top_k experts by r, their weights softmax(r[top_k])
(routing "topk_softmax", Granite) or softmax(r)[top_k], not renormalised (routing "softmax_topk", Jamba), and
out = sum over the chosen experts e of weight_e * down_e(act(gate_e x) * up_e x) (gate and up packed per expert, or
one gated `MLP` per expert with per_expert=True).
`SharedExpertMoE`: TopKMoE(x) + a gated MLP applied to every token (the shared expert).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.mlp import ACTIVATIONS, MLP


ROUTINGS = ("topk_softmax", "softmax_topk")


class TopKMoE(nn.Module):
    """Routed experts. Input and output: (..., d_model). Parameters: router.weight (num_experts, d_model),
    gate_up_proj (num_experts, 2 * d_intermediate, d_model) with the gate first, down_proj (num_experts, d_model,
    d_intermediate); with per_expert=True instead experts.{e} (a gated `MLP`: gate_proj, up_proj, down_proj)."""

    def __init__(self, d_model: int, d_intermediate: int, num_experts: int, top_k: int, activation: str = "silu",
                 routing: str = "topk_softmax", per_expert: bool = False, device=None, dtype=None):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_intermediate", d_intermediate), ("num_experts", num_experts),
                            ("top_k", top_k)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MambaKitError(f"TopKMoE {name} must be a positive integer, got {value!r}")
        if top_k > num_experts:
            raise MambaKitError(f"TopKMoE top_k={top_k} must be <= num_experts={num_experts}")
        if activation not in ACTIVATIONS:
            raise MambaKitError(f"TopKMoE activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if routing not in ROUTINGS or per_expert not in (False, True):
            raise MambaKitError(f"TopKMoE routing must be one of {list(ROUTINGS)} and per_expert True or False, got "
                                f"{routing!r}, {per_expert!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_experts, self.top_k, self.activation = num_experts, top_k, activation
        self.routing, self.per_expert = routing, per_expert
        self.act = ACTIVATIONS[activation]
        self.router = nn.Linear(d_model, num_experts, bias=False, **factory)
        if per_expert:
            self.experts = nn.ModuleList(MLP(d_model, d_intermediate, activation=activation, **factory)
                                         for _ in range(num_experts))
            return
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * d_intermediate, d_model, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_intermediate, **factory))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (tokens, d_model) -> (weights (tokens, top_k) in x's dtype, expert ids (tokens, top_k))."""
        logits = self.router(x)
        if logits.dtype != torch.float64:
            logits = logits.float()  # the choice and the weights in float32 at least, as transformers
        if self.routing == "softmax_topk":
            top, index = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
            return top.to(x.dtype), index
        top, index = logits.topk(self.top_k, dim=-1)
        return torch.softmax(top, dim=-1).to(x.dtype), index

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e on x (tokens, d_model) -> (tokens, d_model), unweighted."""
        if self.per_expert:
            return self.experts[e](x)
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.down_proj[e])

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, index = self.route(flat)
        # one row per (token, chosen slot), each written once: a plain indexed store, then a sum over the slots
        # (index_add_ is far slower on the CPU and gives the same sum)
        rows = flat.new_zeros(flat.shape[0] * self.top_k, flat.shape[1])
        for e in torch.unique(index).tolist():  # only the experts some token chose
            token, slot = torch.where(index == e)
            y = self.expert(e, flat[token]) * weights[token, slot, None]
            rows[token * self.top_k + slot] = y.to(rows.dtype)
        return rows.view(-1, self.top_k, flat.shape[1]).sum(1).view_as(x)


class SharedExpertMoE(nn.Module):
    """moe(x) + shared(x): routed experts plus a gated MLP every token goes through. (..., d_model) both ways."""

    def __init__(self, d_model: int, moe: dict, shared: dict, device=None, dtype=None):
        super().__init__()
        self.moe = TopKMoE(d_model, **moe, device=device, dtype=dtype)
        self.shared = MLP(d_model, gated=True, **shared, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.moe(x) + self.shared(x)
