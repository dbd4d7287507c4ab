"""Mixture-of-experts feed-forward layers, routed per token as transformers' Granite-MoE, Jamba and Nemotron-H
models do.

`TopKMoE`: router logits r = W_router x (num_experts) and the chosen experts with their weights by `routing`:
- "topk_softmax" (Granite): the top_k experts by r, weights softmax(r[top_k]);
- "softmax_topk" (Jamba): the top_k of softmax(r), not renormalised;
- "sigmoid_group" (Nemotron-H, DeepSeek-V3): scores s = sigmoid(r); the experts split into n_group groups, each
  group ranked by the sum of its two best s + e_score_correction_bias, the top_k experts by s + bias taken from the
  best topk_group groups only; weights s[top_k] (divided by their sum with norm_topk_prob), times
  routed_scaling_factor.
out = sum over the chosen experts e of weight_e * expert_e(x), an expert being down_e(act(gate_e x) * up_e x)
(gated: gate and up packed per expert, or one gated `MLP` per expert with per_expert=True) or down_e(act(up_e x))
(gated=False). With latent_size the experts work in that width, between the projections latent_in_proj and
latent_out_proj (the router reads x itself).
`SharedExpertMoE`: TopKMoE(x) + an MLP applied to every token (the shared expert).

"sigmoid_group" keeps its router (router.weight and e_score_correction_bias) in float32 whatever the model's dtype:
built so, and kept so by `module.to(torch.bfloat16)` / `.half()` (float64 passes), and routes in float32 outside any
autocast region, as transformers' Nemotron-H (`_keep_in_fp32_modules_strict`), so that a 16-bit model picks the
experts its float32 router picks. The other routings keep the router in the model's dtype, as transformers does
(Jamba, Granite: the logits in that dtype, then float32).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.mlp import ACTIVATIONS, MLP


ROUTINGS = ("topk_softmax", "softmax_topk", "sigmoid_group")
_HALF = (torch.float16, torch.bfloat16)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_routing_groups(num_experts: int, top_k: int, n_group: int, topk_group: int) -> None:
    """MambaKitError unless "sigmoid_group" routing can choose top_k of num_experts experts from the topk_group
    best of n_group groups (the groups ranked by their two best experts)."""
    if num_experts % n_group or topk_group > n_group:
        raise MambaKitError(f"TopKMoE n_group={n_group} must divide num_experts={num_experts} and topk_group="
                            f"{topk_group} must be <= n_group")
    per_group = num_experts // n_group
    if n_group > 1 and per_group < 2:
        raise MambaKitError(f"TopKMoE groups rank by their two best experts: num_experts / n_group = {per_group} "
                            "must be >= 2")
    if top_k > topk_group * per_group:
        raise MambaKitError(f"TopKMoE top_k={top_k} must be <= the experts of the kept groups, topk_group * "
                            f"num_experts / n_group = {topk_group * per_group}")


class TopKMoE(nn.Module):
    """Routed experts. Input and output: (..., d_model). Parameters: router.weight (num_experts, d_model); gated:
    gate_up_proj (num_experts, 2 * d_intermediate, width) with the gate first, down_proj (num_experts, width,
    d_intermediate); gated=False: up_proj (num_experts, d_intermediate, width), down_proj as gated; with
    per_expert=True instead experts.{e} (an `MLP`: gate_proj (gated only), up_proj, down_proj). width = latent_size
    or d_model. "sigmoid_group" routing adds the buffer e_score_correction_bias (num_experts,); both it and
    router.weight are then float32 even in a 16-bit model (see the module docstring)."""

    def __init__(self, d_model: int, d_intermediate: int, num_experts: int, top_k: int, activation: str = "silu",
                 routing: str = "topk_softmax", per_expert: bool = False, gated: bool = True, n_group: int = 1,
                 topk_group: int = 1, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
                 latent_size: Optional[int] = None, latent_bias: bool = False, device=None, dtype=None):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_intermediate", d_intermediate), ("num_experts", num_experts),
                            ("top_k", top_k), ("n_group", n_group), ("topk_group", topk_group)):
            if not _positive_int(value):
                raise MambaKitError(f"TopKMoE {name} must be a positive integer, got {value!r}")
        if top_k > num_experts:
            raise MambaKitError(f"TopKMoE top_k={top_k} must be <= num_experts={num_experts}")
        if activation not in ACTIVATIONS:
            raise MambaKitError(f"TopKMoE activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        flags = {"per_expert": per_expert, "gated": gated, "norm_topk_prob": norm_topk_prob, "latent_bias": latent_bias}
        if routing not in ROUTINGS or any(v not in (False, True) for v in flags.values()):
            raise MambaKitError(f"TopKMoE routing must be one of {list(ROUTINGS)} and {list(flags)} True or False, "
                                f"got {routing!r}, {flags}")
        if latent_size is not None and not _positive_int(latent_size):
            raise MambaKitError(f"TopKMoE latent_size must be None or a positive integer, got {latent_size!r}")
        scale = routed_scaling_factor
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < float("inf")):
            raise MambaKitError(f"TopKMoE routed_scaling_factor must be a positive finite number, got {scale!r}")
        if routing == "sigmoid_group":
            check_routing_groups(num_experts, top_k, n_group, topk_group)
        elif (n_group, topk_group, norm_topk_prob, scale) != (1, 1, True, 1.0):
            raise MambaKitError(f"TopKMoE n_group, topk_group, norm_topk_prob and routed_scaling_factor belong to the "
                                f"'sigmoid_group' routing, not {routing!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_experts, self.top_k, self.activation = num_experts, top_k, activation
        self.routing, self.per_expert, self.gated = routing, per_expert, gated
        self.n_group, self.topk_group, self.norm_topk_prob = n_group, topk_group, norm_topk_prob
        self.routed_scaling_factor = float(scale)
        self.act = ACTIVATIONS[activation]
        router_dtype = torch.float32 if routing == "sigmoid_group" and dtype in _HALF else dtype
        self.router = nn.Linear(d_model, num_experts, bias=False, device=device, dtype=router_dtype)
        if routing == "sigmoid_group":
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(num_experts, device=device, dtype=torch.float32))
        self.latent_in_proj = self.latent_out_proj = None
        width = d_model
        if latent_size is not None:
            width = latent_size
            self.latent_in_proj = nn.Linear(d_model, latent_size, bias=latent_bias, **factory)
            self.latent_out_proj = nn.Linear(latent_size, d_model, bias=latent_bias, **factory)
        if per_expert:
            self.experts = nn.ModuleList(MLP(width, d_intermediate, activation=activation, gated=gated, **factory)
                                         for _ in range(num_experts))
            return
        if gated:
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * d_intermediate, width, **factory))
            nn.init.normal_(self.gate_up_proj, std=0.02)
        else:
            self.up_proj = nn.Parameter(torch.empty(num_experts, d_intermediate, width, **factory))
            nn.init.normal_(self.up_proj, std=0.02)
        self.down_proj = nn.Parameter(torch.empty(num_experts, width, d_intermediate, **factory))
        nn.init.normal_(self.down_proj, std=0.02)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (tokens, d_model) -> (weights (tokens, top_k), expert ids (tokens, top_k)); the weights in x's dtype,
        float32 at least for "sigmoid_group" (as transformers, whose experts then sum in float32)."""
        if self.routing == "sigmoid_group":
            return self._route_sigmoid_group(x)
        logits = self.router(x)
        if logits.dtype != torch.float64:
            logits = logits.float()  # the choice and the weights in float32 at least, as transformers
        if self.routing == "softmax_topk":
            top, index = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
            return top.to(x.dtype), index
        top, index = logits.topk(self.top_k, dim=-1)
        return torch.softmax(top, dim=-1).to(x.dtype), index

    def _apply(self, fn, recurse=True):
        """nn.Module's conversion (`to`, `half`, `cuda`, ...) with the "sigmoid_group" router left in float32 when
        the conversion would make it 16-bit (it still moves to the new device)."""
        if self.routing != "sigmoid_group":
            return super()._apply(fn, recurse)
        weight = self.router.weight
        kept = {id(t) for t in (weight, weight.grad, self.e_score_correction_bias) if t is not None}

        def convert(t: Tensor) -> Tensor:
            out = fn(t)
            if id(t) in kept and out.dtype in _HALF:
                return t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(convert, recurse)

    def _route_sigmoid_group(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(x.device.type, enabled=False):  # autocast would round the router's product to 16 bits
            scores = F.linear(x.to(dtype), self.router.weight.to(dtype)).sigmoid()
        choice = scores + self.e_score_correction_bias.to(dtype)
        if self.n_group > 1 and self.topk_group < self.n_group:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            best = grouped.topk(2, dim=-1).values.sum(dim=-1).topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        index = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, index)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, index

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e on x (tokens, width) -> (tokens, width), unweighted."""
        if self.per_expert:
            return self.experts[e](x)
        if not self.gated:
            return F.linear(self.act(F.linear(x, self.up_proj[e])), self.down_proj[e])
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.down_proj[e])

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, index = self.route(flat)
        hidden = flat if self.latent_in_proj is None else self.latent_in_proj(flat)
        # one row per (token, chosen slot), each written once: a plain indexed store, then a sum over the slots
        # (index_add_ is far slower on the CPU and gives the same sum)
        rows = hidden.new_zeros(hidden.shape[0] * self.top_k, hidden.shape[1], dtype=weights.dtype)
        for e in torch.unique(index).tolist():  # only the experts some token chose
            token, slot = torch.where(index == e)
            y = self.expert(e, hidden[token]) * weights[token, slot, None]
            rows[token * self.top_k + slot] = y.to(rows.dtype)
        out = rows.view(-1, self.top_k, hidden.shape[1]).sum(1).to(x.dtype)
        if self.latent_out_proj is not None:
            out = self.latent_out_proj(out)
        return out.view_as(x)


class SharedExpertMoE(nn.Module):
    """moe(x) + shared(x): routed experts plus an MLP every token goes through. (..., d_model) both ways.

    moe: `TopKMoE`'s keyword arguments, and optionally "shared": the shared expert's own `MLP` arguments, which then
    replace `shared` (Nemotron-H: the shared expert's width differs from the model's plain MLPs). The shared expert
    is gated unless its arguments say "gated": False."""

    def __init__(self, d_model: int, moe: dict, shared: dict, device=None, dtype=None):
        super().__init__()
        moe = dict(moe)
        shared = dict(moe.pop("shared", shared))
        gated = shared.pop("gated", True)
        self.moe = TopKMoE(d_model, **moe, device=device, dtype=dtype)
        self.shared = MLP(d_model, gated=gated, **shared, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.moe(x) + self.shared(x)
