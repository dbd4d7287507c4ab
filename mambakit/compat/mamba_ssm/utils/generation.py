"""`mamba_ssm.utils.generation`: `InferenceParams`, `sample`, `decode`, `GenerationMixin`, `capture_graph`,
`update_graph_cache` with the official semantics, on mambakit's sampling, decoding steps and CUDA-graph decoder
(one graph per (batch, decoding_seqlen), all on the same states).

`decode` / `generate`: max_length is the total length (prompt + new tokens; at least one new token is produced);
greedy by default (top_k=1); top_k=0 means no limit, top_p=0 means off; stops early once every row's last token is
eos_token_id. Returns sequences (batch, length) or, with return_dict_in_generate, an object with .sequences and
.scores (a tuple of (batch, vocab) logits per new token when output_scores, else None). `cg=True`: on CUDA the
decode steps replay one captured graph (`update_graph_cache`, kept on the model as `_decoding_cache`, as official);
on any other device it decodes eagerly, with the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.layers.state import SSMState
from mambakit.models.cuda_graph import GraphedDecoder, check_decoding_seqlen, check_graphable, check_shared_cache
from mambakit.models.generation import sample_next_token
from mambakit.models.lm import InferenceCache

__all__ = ["DecodingCGCache", "GenerateDecoderOnlyOutput", "GenerationMixin", "InferenceParams", "capture_graph",
           "decode", "sample", "states_of", "update_graph_cache"]


@dataclass
class InferenceParams:
    """The official decoding state holder: key_value_memory_dict maps layer_idx -> (conv_state, ssm_state) for SSM
    layers (mambakit's own state object for attention layers); seqlen_offset counts the tokens already consumed (the
    caller advances it, as official)."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: Dict[int, Any] = field(default_factory=dict)
    lengths_per_sample: Optional[Tensor] = None

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


def as_official(state: Any) -> Any:
    """mambakit's SSMState -> the official (conv_state, ssm_state) tuple; other states unchanged."""
    return (state.conv, state.ssm) if isinstance(state, SSMState) else state


def as_mambakit(entry: Any) -> Any:
    """An entry of key_value_memory_dict -> the state object mambakit's layers update in place."""
    return SSMState(conv=entry[0], ssm=entry[1]) if isinstance(entry, tuple) else entry


def states_of(mixer, inference_params: InferenceParams, batch: int) -> Any:
    """The state of one mixer (its layer_idx) in inference_params, allocated on first use; mambakit's object."""
    store = inference_params.key_value_memory_dict
    if mixer.layer_idx not in store:
        store[mixer.layer_idx] = as_official(mixer.allocate_state(batch))
    return as_mambakit(store[mixer.layer_idx])


def sample(logits: Tensor, top_k: int = 1, top_p: float = 0.0, min_p: float = 0.0,
           temperature: float = 1.0) -> Tensor:
    """logits (batch, vocab) -> token ids (batch,); official defaults (greedy; top_p=0 off, top_k=0 unlimited)."""
    if top_p < 0.0 or top_p > 1.0:
        raise MambaKitError(f"top_p must lie in [0, 1] (0 = off), got {top_p!r}")
    return sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p if top_p > 0.0 else 1.0,
                             min_p=min_p)


@dataclass
class GenerateDecoderOnlyOutput:
    """sequences: (batch, length); scores: one (batch, vocab) tensor per new token, or None."""

    sequences: Tensor
    scores: Optional[Tuple[Tensor, ...]] = None


def _penalise(logits: Tensor, tokens: Tensor, penalty: float) -> Tensor:
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, tokens)
    return logits.scatter(1, tokens, torch.where(seen < 0, seen * penalty, seen / penalty))


@torch.no_grad()
def decode(input_ids: Tensor, model, max_length: int, top_k: int = 1, top_p: float = 0.0, min_p: float = 0.0,
           temperature: float = 1.0, repetition_penalty: float = 1.0, eos_token_id: Optional[int] = None,
           teacher_outputs: Optional[Tensor] = None, vocab_size: Optional[int] = None, cg: bool = False,
           enable_timing: bool = False, output_scores: bool = False, streamer=None) -> GenerateDecoderOnlyOutput:
    """The official decoding loop: input_ids (batch, seqlen) -> sequences (batch, <= max_length).

    model: anything with the official forward(input_ids, position_ids, inference_params, num_last_tokens) and
    .logits. teacher_outputs (batch, length): tokens taken instead of sampling where given. cg: for a model on a
    CUDA device, the prompt is prefilled into the graph's states and every decode step replays the graph captured
    by `update_graph_cache` (model._decoding_cache, reused by later calls); elsewhere (CPU) cg decodes eagerly, the
    same tokens. enable_timing is accepted and ignored.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise MambaKitError(f"input_ids must be a tensor of shape (batch, seqlen >= 1), got {shape}")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise MambaKitError(f"max_length must be a positive integer (the total length), got {max_length!r}")
    batch = input_ids.shape[0]
    graph = cg and graph_decoding(model)
    if graph:
        model._decoding_cache = update_graph_cache(model, getattr(model, "_decoding_cache", None), batch,
                                                   input_ids.shape[1], max_length)
        params = model._decoding_cache.inference_params
        params.reset(max_length, batch)
        _zero_states(params)  # the graph's states hold the last generation's end; mambakit's prefill continues
    else:
        params = InferenceParams(max_seqlen=max_length, max_batch_size=batch)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    sequences, scores = [input_ids], []
    history = input_ids
    while True:
        last = sequences[-1]
        if params.seqlen_offset > 0:
            if eos_token_id is not None and bool((last == eos_token_id).all()):
                break
            if params.seqlen_offset >= max_length - 1:
                break
        position_ids = None
        if params.seqlen_offset > 0:
            position_ids = torch.full((batch, 1), params.seqlen_offset, dtype=torch.long, device=input_ids.device)
        if graph and params.seqlen_offset > 0:
            logits = model._decoding_cache.run(last, position_ids, params.seqlen_offset)[:, -1]
        else:
            logits = model(last, position_ids=position_ids, inference_params=params, num_last_tokens=1).logits[:, -1]
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        if output_scores:
            scores.append(logits.clone())
        params.seqlen_offset += last.shape[1]
        logits = _penalise(logits.float(), history, repetition_penalty)
        if teacher_outputs is not None and teacher_outputs.shape[1] > params.seqlen_offset:
            token = teacher_outputs[:, params.seqlen_offset]
        else:
            token = sample(logits, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature)
        token = token[:, None].to(input_ids.dtype)
        history = torch.cat([history, token], dim=1)
        sequences.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
    if streamer is not None:
        streamer.end()
    return GenerateDecoderOnlyOutput(sequences=torch.cat(sequences, dim=1), scores=tuple(scores))


def graph_decoding(model) -> bool:
    """Whether `decode(cg=True)` replays a CUDA graph for `model`: its parameters are on a CUDA device."""
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return param is not None and param.device.type == "cuda"


def _zero_states(params: InferenceParams) -> None:
    """Zero every state tensor held in params.key_value_memory_dict, in place (a graph keeps pointing at them)."""
    for entry in params.key_value_memory_dict.values():
        for t in (entry if isinstance(entry, tuple) else vars(entry).values()):
            if isinstance(t, Tensor):
                t.zero_()


@dataclass
class DecodingCGCache:
    """The official CUDA-graph decoding cache. callables maps (batch_size, decoding_seqlen) to the graphed step of
    that many tokens per row; run(input_ids (batch, k), position_ids, seqlen) -> logits (batch, k, vocab) through
    the graph of that shape, a fresh tensor. inference_params holds the very tensors every graph reads and advances
    (one set for all k): a prefill through the model's forward(inference_params=cache.inference_params) fills them.
    mempool stays None (each graph has its own)."""

    max_batch_size: int = 0
    max_seqlen: int = 0
    device: Optional[torch.device] = None
    dtype: Optional[torch.dtype] = None
    callables: Dict[Tuple[int, int], Callable] = field(default_factory=dict)
    mempool: Any = None
    inference_params: Optional[InferenceParams] = None
    run: Optional[Callable] = None


def _positive(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MambaKitError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _decoding_seqlens(value: Any) -> Tuple[int, ...]:
    """decoding_seqlens as a tuple of positive integers (at least one), else MambaKitError naming it."""
    seqlens = tuple(value) if isinstance(value, (tuple, list)) else None
    if not seqlens or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in seqlens):
        raise MambaKitError(f"decoding_seqlens must be a non-empty tuple of positive integers (tokens per row of "
                            f"each captured step), got {value!r}")
    return seqlens


@torch.no_grad()
def update_graph_cache(model, cache: Optional[DecodingCGCache], batch_size: int, seqlen_og: int, max_seqlen: int,
                       decoding_seqlens: Tuple[int, ...] = (1,), dtype: Optional[torch.dtype] = None,
                       n_warmups: int = 2) -> DecodingCGCache:
    """The official entry point on `mambakit.models.cuda_graph.GraphedDecoder` (CUDA, SSM-only models): returns
    cache (a new one for None) holding one graphed step of k tokens per row for every k in decoding_seqlens at
    batch_size, all advancing the same states (cache.inference_params). Everything is captured again when the
    device, dtype or batch size changes or max_seqlen grows (the official keeps smaller batches too); a k not yet
    captured is added on the same states. inference_params.seqlen_offset is left at 0, as official."""
    if cache is not None and not isinstance(cache, DecodingCGCache):
        raise MambaKitError(f"cache must be a DecodingCGCache or None, got {type(cache).__name__}")
    _positive("batch_size", batch_size)
    _positive("seqlen_og", seqlen_og, minimum=0)
    _positive("max_seqlen", max_seqlen)
    _positive("n_warmups", n_warmups)
    seqlens = _decoding_seqlens(decoding_seqlens)
    cache = DecodingCGCache() if cache is None else cache
    device = check_graphable(model, batch_size)
    dtype = dtype or next(model.parameters()).dtype
    if (device, dtype, batch_size) != (cache.device, cache.dtype, cache.max_batch_size) \
            or max_seqlen > cache.max_seqlen or not cache.callables:
        cache.callables, cache.inference_params, cache.run = {}, None, None  # drop the old graphs first
        cache.device, cache.dtype, cache.max_batch_size, cache.max_seqlen = device, dtype, batch_size, max_seqlen
        cache.inference_params = InferenceParams(
            max_seqlen=max_seqlen, max_batch_size=batch_size, seqlen_offset=seqlen_og,
            lengths_per_sample=torch.full((batch_size,), seqlen_og, dtype=torch.int32, device=device))
    for k in seqlens:  # the first capture allocates the states, the others take them from inference_params
        if (batch_size, k) not in cache.callables:
            cache.callables[batch_size, k] = capture_graph(model, cache.inference_params, batch_size, max_seqlen,
                                                           decoding_seqlen=k, n_warmups=n_warmups, dtype=dtype)

    def run(input_ids: Tensor, position_ids: Optional[Tensor] = None, seqlen: Optional[int] = None) -> Tensor:
        key = tuple(input_ids.shape[:2])
        if key not in cache.callables:
            raise MambaKitError(f"input_ids must have shape one of {sorted(cache.callables)} (batch, decoding "
                                f"seqlen) captured, got {tuple(input_ids.shape)}")
        return cache.callables[key](input_ids, position_ids, seqlen)

    cache.run = run
    cache.inference_params.seqlen_offset = 0
    return cache


def _cache_in(model, store: Dict[int, Any], batch_size: int, dtype: Optional[torch.dtype],
              device: torch.device) -> Optional[InferenceCache]:
    """The states of store (key_value_memory_dict) as one InferenceCache over those very tensors, when every layer
    has one of the layout model.allocate_cache(batch_size, dtype, device) gives; else None."""
    n_layer = len(model.backbone.layers)
    if any(i not in store for i in range(n_layer)):
        return None
    cache = InferenceCache(states=[as_mambakit(store[i]) for i in range(n_layer)])
    try:
        check_shared_cache(model, cache, batch_size, dtype, device)
    except MambaKitError:
        return None
    return cache


def _take_over(states: list, store: Dict[int, Any], batch_size: int) -> None:
    """Copy what store holds into the graph's fresh states, then make them store's entries."""
    for i, state in enumerate(states):
        if i in store and state is not None:
            old = as_mambakit(store[i])
            for name, t in vars(state).items():
                src = getattr(old, name, None)
                if isinstance(t, Tensor) and isinstance(src, Tensor):
                    if src.shape != t.shape:
                        raise MambaKitError(f"inference_params holds states of shape {tuple(src.shape)} for layer "
                                            f"{i} ({name}), the graph's at batch_size {batch_size} are "
                                            f"{tuple(t.shape)}")
                    t.copy_(src)
        store[i] = as_official(state)


@torch.no_grad()
def capture_graph(model, inference_params: InferenceParams, batch_size: int, max_seqlen: int,
                  decoding_seqlen: int = 1, mempool: Any = None, n_warmups: int = 2,
                  dtype: Optional[torch.dtype] = None) -> Callable:
    """The official `capture_graph` on `mambakit.models.cuda_graph.GraphedDecoder` (CUDA, SSM-only models): one
    model step of decoding_seqlen tokens per row at batch_size captured in a graph. Returns run(input_ids
    (batch_size, decoding_seqlen), position_ids, seqlen) -> logits (batch_size, decoding_seqlen, vocab), a fresh
    tensor, the states of inference_params advanced in place (by decoding_seqlen tokens).

    When inference_params.key_value_memory_dict (layer_idx -> (conv_state, ssm_state)) already holds every layer's
    states in the layout the graph needs (batch_size, dtype, device), the graph reads and advances those very
    tensors, as official (so graphs of several decoding_seqlen on one inference_params share the states; their
    contents are kept through the capture). Otherwise the graph has its own, holding what the entries held, and
    they replace the entries (tensors taken from the dict before the call are then no longer the graph's). mempool
    is accepted and not used (the graph has its own pool); dtype (mambakit's): the conv states' dtype, default that
    of the states already in inference_params, else the model's. max_seqlen is not needed by the constant-size
    states.
    """
    check_decoding_seqlen(decoding_seqlen)
    _positive("max_seqlen", max_seqlen)
    _positive("n_warmups", n_warmups)
    device = check_graphable(model, batch_size)
    store = inference_params.key_value_memory_dict
    if dtype is None and store:
        dtype = next(iter(as_mambakit(e).conv.dtype for e in store.values() if isinstance(e, tuple)), None)
    shared = _cache_in(model, store, batch_size, dtype, device)
    decoder = GraphedDecoder(model, batch_size, dtype=dtype, warmup=n_warmups, decoding_seqlen=decoding_seqlen,
                             cache=shared)
    if shared is None:
        _take_over(decoder.cache.states, store, batch_size)

    def run(input_ids: Tensor, position_ids: Optional[Tensor] = None, seqlen: Optional[int] = None) -> Tensor:
        if input_ids.dim() != 2 or tuple(input_ids.shape) != (batch_size, decoding_seqlen):
            raise MambaKitError(f"input_ids must have shape (batch_size={batch_size}, decoding_seqlen="
                                f"{decoding_seqlen}), got {tuple(input_ids.shape)}")
        if inference_params.lengths_per_sample is not None and seqlen is not None:
            inference_params.lengths_per_sample[:] = seqlen
        return decoder.decode_tokens(input_ids).clone()

    return run


class GenerationMixin:
    """The official `generate` / `allocate_inference_cache` pair for a model with the official forward."""

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        raise NotImplementedError

    def generate(self, input_ids: Tensor, max_length: int, top_k: int = 1, top_p: float = 0.0, min_p: float = 0.0,
                 temperature: float = 1.0, return_dict_in_generate: bool = False, output_scores: bool = False,
                 **kwargs):
        """Official semantics (see `decode`): sequences (batch, <= max_length), or with return_dict_in_generate
        an object with .sequences and .scores (None unless output_scores)."""
        out = decode(input_ids, self, max_length, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature,
                     output_scores=output_scores, **kwargs)
        if not output_scores:
            out.scores = None
        return out if return_dict_in_generate else out.sequences
