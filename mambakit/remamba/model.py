"""ReMamba (Yuan et al., 2024): read the prompt twice.

Stage 1, selective compression: the base model reads the prompt (length L); with H (batch, L, d_model) its hidden
states after the final norm, each position i of the span is scored by cos(K(H_i), Q(H_{L-1})); the K best are kept in
their original order with weights w = ReLU(score) and replaced in the input by V(H_selected).
Stage 2, selective adaptation: the base model reads [embeddings before the span, V(H_selected), embeddings after the
span] with delta changed to w * delta + b at the selected positions (see `adaptation`). Generation continues from
the state after stage 2, so each new token costs what it costs without ReMamba.

Q, K, V are two-layer MLPs (Linear -> SiLU -> Linear, width d_model); b is one zero-initialised vector per Mamba
layer. Together they are `ReMambaAdapter`; `ReMambaLM` pairs it with a (usually frozen) `MambaLMHeadModel`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.models.lm import CausalLMOutput, InferenceCache, MambaLMHeadModel
from mambakit.remamba.adaptation import delta_size, selective_adaptation
from mambakit.remamba.config import ReMambaConfig, SpanPlan


class MLP(nn.Module):
    """Linear(d, d) -> SiLU -> Linear(d, d). (..., d) -> (..., d)."""

    def __init__(self, d: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(d, d, device=device, dtype=dtype)
        self.fc2 = nn.Linear(d, d, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class ReMambaAdapter(nn.Module):
    """The parameters ReMamba adds: q, k, v MLPs (width d_model) and b[i] (delta entries of layer i, zeros)."""

    def __init__(self, base: MambaLMHeadModel, device=None, dtype=None):
        super().__init__()
        d = base.config.d_model
        ref = base.lm_head.weight
        device = device or ref.device
        dtype = dtype or ref.dtype
        self.q = MLP(d, device=device, dtype=dtype)
        self.k = MLP(d, device=device, dtype=dtype)
        self.v = MLP(d, device=device, dtype=dtype)
        sizes = [delta_size(layer.mixer) for layer in base.backbone.layers]
        if all(n is None for n in sizes):
            raise MambaKitError("ReMamba needs at least one Mamba or Mamba-2 layer with a delta; the model has none "
                                f"(mixer layer {base.config.mixer_layer!r})")
        self.has_b = [n is not None for n in sizes]
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(n or 0, device=device, dtype=dtype)) for n in sizes)

    def biases(self) -> list[Optional[Tensor]]:
        return [b if has else None for b, has in zip(self.b, self.has_b)]


@dataclass
class Compression:
    """The result of stage 1 for a batch. index: (batch, K) positions kept, relative to plan.start (ascending);
    weights: (batch, K) w = ReLU(cos score); embeds: (batch, K, d_model) the V(H) that replace the span."""

    plan: SpanPlan
    index: Tensor
    weights: Tensor
    embeds: Tensor


def _check_prompt(input_ids: Tensor) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise MambaKitError(f"input_ids must have shape (batch, seqlen >= 1), got {shape}")


class ReMambaLM(nn.Module):
    """A base LM with ReMamba's added parameters. `forward` trains, `generate(..., remamba=cfg)` answers."""

    def __init__(self, base: MambaLMHeadModel, adapter: Optional[ReMambaAdapter] = None):
        super().__init__()
        self.base = base
        self.adapter = adapter if adapter is not None else ReMambaAdapter(base)

    @property
    def config(self):
        return self.base.config

    def _mixers(self) -> list[nn.Module]:
        return [layer.mixer for layer in self.base.backbone.layers]

    # ------------------------------------------------------------------------------------------------------------------
    def compress(self, input_ids: Tensor, remamba: ReMambaConfig, hidden: Optional[Tensor] = None) -> Compression:
        """Stage 1. input_ids: (batch, L). hidden: the base's final hidden states (batch, L, d_model) if already
        computed. The base runs without gradient (it is frozen); gradients reach q, k, v."""
        _check_prompt(input_ids)
        plan = remamba.plan(input_ids.shape[1])
        batch, d = input_ids.shape[0], self.config.d_model
        if plan.is_noop:
            empty = self.adapter.v.fc2.weight.new_zeros
            return Compression(plan, input_ids.new_zeros(batch, 0), empty(batch, 0), empty(batch, 0, d))
        if hidden is None:
            with torch.no_grad():
                hidden = self.base.backbone(input_ids)  # (batch, L, d_model)
        span = hidden[:, plan.start:plan.start + plan.length]  # (batch, n, d_model)
        query = self.adapter.q(hidden[:, -1])  # (batch, d_model)
        scores = F.cosine_similarity(self.adapter.k(span), query[:, None, :], dim=-1)  # (batch, n)
        index = scores.topk(plan.keep, dim=1).indices.sort(dim=1).values  # (batch, K), original order
        weights = F.relu(scores.gather(1, index))
        chosen = span.gather(1, index[:, :, None].expand(-1, -1, d))  # (batch, K, d_model)
        return Compression(plan, index, weights, self.adapter.v(chosen))

    def stage2_embeds(self, input_ids: Tensor, comp: Compression, extra_ids: Optional[Tensor] = None) -> Tensor:
        """[emb(before span), comp.embeds, emb(after span), emb(extra_ids)]: (batch, L - n + K (+ extra), d_model)."""
        emb = self.base.backbone.embedding
        p = comp.plan
        parts = [emb(input_ids[:, :p.start]), comp.embeds.to(emb.weight.dtype), emb(input_ids[:, p.start + p.length:])]
        if extra_ids is not None:
            parts.append(emb(extra_ids))
        return torch.cat(parts, dim=1)

    def adapted_forward(self, input_ids: Tensor, comp: Compression, extra_ids: Optional[Tensor] = None,
                        cache: Optional[InferenceCache] = None, num_last_tokens: int = 0,
                        labels: Optional[Tensor] = None, return_logits: bool = True) -> CausalLMOutput:
        """Stage 2 on the compressed prompt, followed by extra_ids (batch, E) if given (teacher-forced answer).
        labels: (batch, stage-2 length) targets, -100 ignored. cache: left holding the state after the pass.
        return_logits=False: the loss alone, without the logits (the base model's forward option)."""
        embeds = self.stage2_embeds(input_ids, comp, extra_ids)
        kwargs = dict(inputs_embeds=embeds, cache=cache, num_last_tokens=num_last_tokens, labels=labels,
                      return_logits=return_logits)
        if comp.plan.is_noop:
            return self.base(**kwargs)
        with selective_adaptation(self._mixers(), self.adapter.biases(), comp.weights, comp.plan.start):
            return self.base(**kwargs)

    def forward(self, input_ids: Tensor, remamba: ReMambaConfig, answer_ids: Optional[Tensor] = None,
                cache: Optional[InferenceCache] = None, num_last_tokens: int = 0,
                return_logits: bool = True) -> CausalLMOutput:
        """Both stages. input_ids: (batch, L) prompt; answer_ids: (batch, A) teacher-forced answer: the loss is the
        mean cross-entropy of the A answer tokens (predicted from the last prompt position on).
        logits: (batch, L - n + K + A - 1, vocab) (or the last num_last_tokens); None with return_logits=False
        (needs answer_ids: the loss computed without them)."""
        comp = self.compress(input_ids, remamba)
        if answer_ids is None:
            return self.adapted_forward(input_ids, comp, cache=cache, num_last_tokens=num_last_tokens,
                                        return_logits=return_logits)
        if answer_ids.dim() != 2 or answer_ids.shape[0] != input_ids.shape[0] or answer_ids.shape[1] == 0:
            raise MambaKitError(f"answer_ids must have shape (batch={input_ids.shape[0]}, A >= 1), got "
                                f"{tuple(answer_ids.shape)}")
        length = comp.plan.compressed_len(input_ids.shape[1])
        n_ans = answer_ids.shape[1]
        labels = answer_ids.new_full((input_ids.shape[0], length + n_ans - 1), -100)
        labels[:, length - 1:] = answer_ids
        return self.adapted_forward(input_ids, comp, extra_ids=answer_ids[:, :-1], cache=cache,
                                    num_last_tokens=num_last_tokens, labels=labels, return_logits=return_logits)

    # ------------------------------------------------------------------------------------------------------------------
    def prefill(self, input_ids: Tensor, remamba: ReMambaConfig) -> tuple[Tensor, InferenceCache]:
        """Both stages into a fresh cache. Returns the logits of the last position (batch, vocab) and the cache."""
        cache = self.base.allocate_cache(input_ids.shape[0], device=input_ids.device)
        logits = self.forward(input_ids, remamba, cache=cache, num_last_tokens=1).logits[:, -1]
        return logits, cache

    def generate(self, input_ids: Tensor, max_new_tokens: int, remamba: Optional[ReMambaConfig] = None,
                 **sampling) -> Tensor:
        """`MambaLMHeadModel.generate` with ReMamba's two-stage prefill when `remamba` is given (else the plain one).
        Returns (batch, L + max_new_tokens): the original prompt followed by the new tokens."""
        if remamba is None:
            return self.base.generate(input_ids, max_new_tokens, **sampling)
        from mambakit.remamba.generation import remamba_generate

        return remamba_generate(self, input_ids, max_new_tokens, remamba, **sampling)
