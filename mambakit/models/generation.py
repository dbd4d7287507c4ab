"""Token sampling and the generate loop: one parallel prefill, then one-token steps from a constant-size state."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambakit.errors import MambaKitError


def sample_next_token(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      min_p: float = 0.0, generator: Optional[torch.Generator] = None) -> Tensor:
    """logits: (batch, vocab) -> (batch,) token ids. Greedy when temperature == 0 or top_k == 1."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _apply_repetition_penalty(logits: Tensor, tokens: Tensor, penalty: float) -> Tensor:
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, tokens)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, tokens, seen)


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int, top_p: float, min_p: float,
                        repetition_penalty: float) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise MambaKitError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise MambaKitError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise MambaKitError(f"top_k must be >= 0 (0 = no limit), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise MambaKitError(f"top_p must lie in (0, 1], got {top_p}")
    if not 0.0 <= min_p < 1.0:
        raise MambaKitError(f"min_p must lie in [0, 1), got {min_p}")
    if repetition_penalty <= 0:
        raise MambaKitError(f"repetition_penalty must be > 0, got {repetition_penalty}")


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
             eos_token_id: Optional[int] = None, attention_mask: Optional[Tensor] = None,
             cuda_graph: bool = False) -> Tensor:
    """input_ids: (batch, seqlen) (left-padded where attention_mask has zeros). Returns (batch, seqlen + new).

    cuda_graph: decode through a `GraphedDecoder` (the one-token step captured in a CUDA graph, replayed per token;
    CUDA only, SSM layers only: MambaKitError otherwise). Same tokens as eager decoding."""
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise MambaKitError(f"input_ids must have shape (batch, seqlen >= 1), got {tuple(input_ids.shape)}")
    if not isinstance(cuda_graph, bool):
        raise MambaKitError(f"cuda_graph must be True or False, got {cuda_graph!r}")
    vocab = model.config.vocab_size
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device)
        generator.manual_seed(seed)
    batch = input_ids.shape[0]
    if cuda_graph:
        from mambakit.models.cuda_graph import check_graphable, graphed_decoder

        device = check_graphable(model, batch)
        if input_ids.device != device:
            raise MambaKitError(f"input_ids must be on the model's device {device}, got {input_ids.device}")
        decoder = graphed_decoder(model, batch)
        logits = decoder.prefill(input_ids, attention_mask=attention_mask)
        step = decoder.step
    else:
        cache = model.allocate_cache(batch, device=input_ids.device)
        logits = model(input_ids, cache=cache, num_last_tokens=1, attention_mask=attention_mask).logits[:, -1]

        def step(next_token: Tensor) -> Tensor:
            return model.step(next_token, cache)
    tokens = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        logits = _apply_repetition_penalty(logits[:, :vocab].float(), tokens, repetition_penalty)
        next_token = sample_next_token(logits, temperature, top_k, top_p, min_p, generator)
        if eos_token_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
            finished |= next_token == eos_token_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if i + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
            break
        logits = step(next_token)
    if tokens.shape[1] < input_ids.shape[1] + max_new_tokens and eos_token_id is not None:
        pad = torch.full((batch, input_ids.shape[1] + max_new_tokens - tokens.shape[1]), eos_token_id,
                         dtype=tokens.dtype, device=tokens.device)
        tokens = torch.cat([tokens, pad], dim=1)
    return tokens
