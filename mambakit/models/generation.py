"""Token sampling and the generate loop: one parallel prefill, then one-token steps from a constant-size state."""
from __future__ import annotations

import math
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
    logits = torch.where(torch.isfinite(logits).all(-1, keepdim=True), logits, 0.0)  # valid probs; caller reports
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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: The most tokens one generate call may add: far beyond what the models are trained for, and small enough that the
#: (batch, prompt + max_new_tokens) output is allocatable; a larger count is a typo (1e20), not a request.
MAX_NEW_TOKENS = 10**7


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int, top_p: float, min_p: float,
                        repetition_penalty: float, seed: Optional[int] = None,
                        eos_token_id: Optional[int] = None, vocab_size: Optional[int] = None) -> None:
    """MambaKitError naming the argument, the expected and the actual value, for any out-of-range option."""
    if not _is_int(max_new_tokens) or not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise MambaKitError(f"max_new_tokens must be an integer in [0, {MAX_NEW_TOKENS}], got {max_new_tokens!r}")
    if not _is_real(temperature) or temperature < 0:
        raise MambaKitError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise MambaKitError(f"top_k must be an integer >= 0 (0 = no limit), got {top_k!r}")
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise MambaKitError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if not _is_real(min_p) or not 0.0 <= min_p < 1.0:
        raise MambaKitError(f"min_p must be a number in [0, 1), got {min_p!r}")
    if not _is_real(repetition_penalty) or repetition_penalty <= 0:
        raise MambaKitError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty!r}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise MambaKitError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if eos_token_id is not None and (not _is_int(eos_token_id) or not 0 <= eos_token_id < (vocab_size or 2**63)):
        raise MambaKitError(f"eos_token_id must be a token id in [0, {vocab_size}), got {eos_token_id!r}")


def check_left_padded_mask(attention_mask: Tensor, input_ids: Tensor) -> None:
    """attention_mask: (batch, seqlen) of 0/1, each row padding first then tokens (left padding), at least one token
    per row. Generation continues from the last position, so a right-padded row would continue from a pad."""
    if not isinstance(attention_mask, Tensor):
        raise MambaKitError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise MambaKitError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                            f"{tuple(attention_mask.shape)}")
    if attention_mask.dtype.is_complex or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise MambaKitError("attention_mask must hold only 0 (padding) and 1 (token)")
    m = attention_mask.long()
    if not bool((m[:, 1:] >= m[:, :-1]).all()):
        rows = torch.nonzero((m[:, 1:] < m[:, :-1]).any(1)).flatten().tolist()
        raise MambaKitError(f"attention_mask must be left-padded for generation (zeros before the tokens); rows "
                            f"{rows[:8]} have a padding after a token")
    if not bool(m[:, -1].all()):
        rows = torch.nonzero(m[:, -1] == 0).flatten().tolist()
        raise MambaKitError(f"attention_mask rows {rows[:8]} hold no token")


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
             eos_token_id: Optional[int] = None, attention_mask: Optional[Tensor] = None,
             cuda_graph: bool = False, state_dtype: Optional[torch.dtype] = None) -> Tensor:
    """input_ids: (batch, seqlen) (left-padded where attention_mask has zeros). Returns (batch, seqlen + new).

    state_dtype: the SSM states' dtype while decoding (default float32; see `MambaLMHeadModel.allocate_cache`).

    cuda_graph: decode through a `GraphedDecoder` (the one-token step captured in a CUDA graph, replayed per token;
    CUDA only, SSM layers only: MambaKitError otherwise). Same tokens as eager decoding."""
    vocab = model.config.vocab_size
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, eos_token_id,
                        vocab)
    if not isinstance(input_ids, Tensor):
        raise MambaKitError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise MambaKitError(f"input_ids must have shape (batch, seqlen >= 1), got {tuple(input_ids.shape)}")
    if not isinstance(cuda_graph, bool):
        raise MambaKitError(f"cuda_graph must be True or False, got {cuda_graph!r}")
    if attention_mask is not None:
        check_left_padded_mask(attention_mask, input_ids)
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
        decoder = graphed_decoder(model, batch, state_dtype=state_dtype)
        logits = decoder.prefill(input_ids, attention_mask=attention_mask)
        step = decoder.step
    else:
        from mambakit.models.cuda_graph import allocate_cache

        cache = allocate_cache(model, batch, None, input_ids.device, state_dtype)
        logits = model(input_ids, cache=cache, num_last_tokens=1, attention_mask=attention_mask).logits[:, -1]

        def step(next_token: Tensor) -> Tensor:
            return model.step(next_token, cache)
    tokens = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    # a non-finite logit anywhere makes this running sum non-finite: one check after the loop, no per-token sync
    logit_sum = torch.zeros(batch, device=input_ids.device)
    for i in range(max_new_tokens):
        logits = _apply_repetition_penalty(logits[:, :vocab].float(), tokens, repetition_penalty)
        logit_sum += logits.sum(-1)
        next_token = sample_next_token(logits, temperature, top_k, top_p, min_p, generator)
        if eos_token_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
            finished |= next_token == eos_token_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if i + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
            break
        logits = step(next_token)
    if max_new_tokens and not bool(torch.isfinite(logit_sum).all()):
        rows = torch.nonzero(~torch.isfinite(logit_sum)).flatten().tolist()
        raise MambaKitError(f"the model produced non-finite logits (NaN or inf) while generating rows {rows[:8]}: "
                            "its weights or inputs hold non-finite values")
    if tokens.shape[1] < input_ids.shape[1] + max_new_tokens and eos_token_id is not None:
        pad = torch.full((batch, input_ids.shape[1] + max_new_tokens - tokens.shape[1]), eos_token_id,
                         dtype=tokens.dtype, device=tokens.device)
        tokens = torch.cat([tokens, pad], dim=1)
    return tokens
