"""The decoding step of a Mamba LM (one token, or k tokens per row) captured in a CUDA graph.

An eager step launches several hundred small kernels (about 30 per layer) whose launch cost, not the GPU work, sets
the time per token at small batch. Captured once and replayed, the whole step is one launch. The recurrent state of a
Mamba LM has a fixed size whatever the context length, so one graph per batch size serves every position:

    decoder = GraphedDecoder(model, batch_size=16)      # static cache + token buffer, warm-up, capture
    logits = decoder.prefill(prompt_ids)                # (16, vocab) of the last prompt token; fills the static cache
    for _ in range(n):
        logits = decoder.step(logits.argmax(-1))        # copy the tokens in, replay the graph

`step` returns the graph's static output buffer: it is overwritten by the next `step`, so use (or clone) it first.
Several tokens per row at once (speculative decoding, multi-token verification), one graph per k on ONE set of
states:

    one = GraphedDecoder(model, batch_size=16)
    four = GraphedDecoder(model, batch_size=16, decoding_seqlen=4, cache=one.cache)   # the same state tensors
    logits = one.prefill(prompt_ids)
    logits4 = four.decode_tokens(draft)                 # draft (16, 4) -> (16, 4, vocab), = 4 one-token steps
    logits = one.step(next_tokens)                      # continues after the 4 tokens

CUDA only; models with attention layers (a KV cache that grows) are refused.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.layers.moe import TopKMoE


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration as exc:  # pragma: no cover - every LM has parameters
        raise MambaKitError("the model has no parameters") from exc


def check_graphable(model, batch_size) -> torch.device:
    """Raise MambaKitError unless `model` can decode through a CUDA graph at `batch_size`; returns its device."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise MambaKitError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (hasattr(model, "allocate_cache") and hasattr(model, "step")):
        raise MambaKitError(f"GraphedDecoder needs a mambakit LM (allocate_cache and step), got {type(model).__name__}")
    if isinstance(model, torch.nn.Module) and any(isinstance(m, TopKMoE) for m in model.modules()):
        raise MambaKitError("CUDA-graph decoding does not support routed experts (MoE layers choose their experts on "
                            "the host at every token): use cuda_graph=False")
    attn = list(getattr(getattr(model, "config", None), "attn_layer_idx", None) or [])
    if attn:
        raise MambaKitError(f"CUDA-graph decoding supports SSM layers only; this model has attention layers {attn} "
                            "whose KV cache grows with the context: use cuda_graph=False")
    device = _model_device(model)
    if device.type != "cuda":
        raise MambaKitError(f"CUDA-graph decoding needs the model on a CUDA device, it is on {device}; "
                            "use cuda_graph=False (eager decoding) on the CPU")
    if not torch.cuda.is_available():  # pragma: no cover - a CUDA parameter implies CUDA
        raise MambaKitError("CUDA-graph decoding needs CUDA, which is not available")
    return device


def check_decoding_seqlen(decoding_seqlen) -> None:
    """MambaKitError unless decoding_seqlen (the tokens per row of one captured step) is a positive integer."""
    if not isinstance(decoding_seqlen, int) or isinstance(decoding_seqlen, bool) or decoding_seqlen < 1:
        raise MambaKitError(f"decoding_seqlen must be a positive integer (tokens per row of one step), got "
                            f"{decoding_seqlen!r}")


def _state_tensors(cache) -> list[Tensor]:
    """Every tensor of every layer's state in cache (in layer order; a layer without a mixer has none)."""
    return [t for state in cache.states if state is not None for t in vars(state).values() if isinstance(t, Tensor)]


def check_shared_cache(model, cache, batch_size: int, dtype: Optional[torch.dtype], device: torch.device,
                       state_dtype: Optional[torch.dtype] = None) -> None:
    """MambaKitError unless `cache` (another decoder's `.cache`, or model.allocate_cache(...)) holds state tensors of
    the shapes, dtypes and device that model.allocate_cache(batch_size, dtype, device, state_dtype) would give."""
    if not (hasattr(cache, "states") and hasattr(cache, "seqlen_offset")):
        raise MambaKitError(f"cache must be an InferenceCache (model.allocate_cache or a GraphedDecoder's .cache), "
                            f"got {type(cache).__name__}")
    want, got = ([(tuple(t.shape), t.dtype, t.device) for t in _state_tensors(c)]
                 for c in (allocate_cache(model, batch_size, dtype, device, state_dtype), cache))
    if want != got:
        where = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        expected, actual = (v[where] if where < len(v) else "none" for v in (want, got))
        raise MambaKitError(f"cache must hold the states of model.allocate_cache(batch_size={batch_size}, "
                            f"dtype={dtype}, device={device}, state_dtype={state_dtype}): "
                            f"state tensor {where} should be (shape, dtype, "
                            f"device) {expected}, got {actual}")


def allocate_cache(model, batch_size: int, dtype: Optional[torch.dtype] = None, device=None,
                   state_dtype: Optional[torch.dtype] = None):
    """model.allocate_cache(batch_size, dtype, device), passing state_dtype only when given (a duck-typed model may
    not take it)."""
    if state_dtype is None:
        return model.allocate_cache(batch_size, dtype=dtype, device=device)
    return model.allocate_cache(batch_size, dtype=dtype, device=device, state_dtype=state_dtype)


class GraphedDecoder:
    """A static inference cache and token buffer for `model` at `batch_size`, with a decoding step of
    `decoding_seqlen` tokens per row captured in a graph (k = 1: `model.step`; k > 1: `model.decode_tokens`).

    dtype: the conv-state dtype (default: the model's); state_dtype: the SSM states' (default float32, as in eager
    decoding; see `MambaLMHeadModel.allocate_cache`).
    warmup: eager steps run on a side stream before the capture (Triton compiles, cuBLAS picks its kernels).
    cache: the state tensors to read and advance (another decoder's `.cache`, same batch size and dtype), so that
    decoders of several k advance ONE set of states; they are kept as they were through the warm-up and the capture.
    Without it the decoder allocates its own, zero.
    """

    def __init__(self, model, batch_size: int, dtype: Optional[torch.dtype] = None, warmup: int = 2,
                 decoding_seqlen: int = 1, cache=None, state_dtype: Optional[torch.dtype] = None):
        check_decoding_seqlen(decoding_seqlen)
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise MambaKitError(f"warmup must be an integer >= 1, got {warmup!r}")
        self.device = check_graphable(model, batch_size)
        if decoding_seqlen > 1 and not hasattr(model, "decode_tokens"):
            raise MambaKitError(f"decoding_seqlen={decoding_seqlen} needs a model with decode_tokens (a mambakit LM), "
                                f"got {type(model).__name__}")
        if cache is not None:
            check_shared_cache(model, cache, batch_size, dtype, self.device, state_dtype)
        self.model = model
        self.batch_size = batch_size
        self.decoding_seqlen = decoding_seqlen
        self.vocab_size = model.config.padded_vocab_size
        self.cache = allocate_cache(model, batch_size, dtype, self.device, state_dtype) if cache is None else cache
        self.tokens = torch.zeros(batch_size, decoding_seqlen, dtype=torch.long, device=self.device)
        kept = [t.clone() for t in _state_tensors(self.cache)], self.cache.seqlen_offset
        self.logits = self._capture(warmup)  # (batch_size, decoding_seqlen, padded_vocab_size), the graph's output
        for t, saved in zip(_state_tensors(self.cache), kept[0]):  # the warm-up and capture ran on these states
            t.copy_(saved)
        self.cache.seqlen_offset = kept[1]

    @torch.no_grad()
    def _run(self) -> Tensor:
        """The step the graph holds: self.tokens (batch, k) through the model from self.cache -> (batch, k, vocab)."""
        if self.decoding_seqlen == 1:
            return self.model.step(self.tokens, self.cache)[:, None]
        return self.model.decode_tokens(self.tokens, self.cache)

    @torch.no_grad()
    def _capture(self, warmup: int) -> Tensor:
        """`warmup` eager runs of `_run` on a side stream, then one captured into self.graph; its output buffer."""
        with torch.cuda.device(self.device):
            self.graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    self._run()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
            with torch.cuda.graph(self.graph):
                logits = self._run()
            torch.cuda.synchronize(self.device)
        return logits

    def _replay(self) -> None:
        self.graph.replay()

    # ------------------------------------------------------------------------------------------------------------------
    @property
    def seqlen_offset(self) -> int:
        """Tokens seen since the last reset/prefill (prompt + decoded)."""
        return self.cache.seqlen_offset

    def reset(self) -> None:
        """Zero the static state (in place: the graph keeps pointing at the same tensors; shared with every decoder
        built on this cache)."""
        for t in _state_tensors(self.cache):
            t.zero_()
        self.cache.seqlen_offset = 0

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Run the prompt (batch_size, seqlen) through the parallel forward straight into the static cache.

        attention_mask: (batch_size, seqlen), 0 at left padding. Returns the logits of the last position
        (batch_size, padded_vocab_size) (a fresh tensor, not the graph's buffer)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size or input_ids.shape[1] == 0:
            raise MambaKitError(f"input_ids must have shape (batch_size={self.batch_size}, seqlen >= 1), got "
                                f"{tuple(input_ids.shape)}")
        if input_ids.device != self.device:
            raise MambaKitError(f"input_ids must be on {self.device}, got {input_ids.device}")
        self.reset()
        out = self.model(input_ids, cache=self.cache, num_last_tokens=1, attention_mask=attention_mask)
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """tokens: (batch_size,) or (batch_size, 1) -> logits (batch_size, padded_vocab_size), the graph's static
        output (overwritten by the next step). Updates the static cache in place. A decoder of decoding_seqlen 1."""
        if self.decoding_seqlen != 1:
            raise MambaKitError(f"step takes one token per row; this decoder captured decoding_seqlen="
                                f"{self.decoding_seqlen}: use decode_tokens(tokens (batch_size, "
                                f"{self.decoding_seqlen}))")
        if tokens.numel() != self.batch_size or tokens.dim() > 2:
            raise MambaKitError(f"tokens must have shape (batch_size={self.batch_size},), got {tuple(tokens.shape)}")
        return self.decode_tokens(tokens.reshape(-1, 1))[:, 0]

    @torch.no_grad()
    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """tokens: (batch_size, decoding_seqlen) -> logits (batch_size, decoding_seqlen, padded_vocab_size), the
        graph's static output (overwritten by the next call), equal to decoding_seqlen one-token steps. Advances the
        static cache by decoding_seqlen tokens in place."""
        want = (self.batch_size, self.decoding_seqlen)
        if not isinstance(tokens, Tensor) or tuple(tokens.shape) != want:
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise MambaKitError(f"tokens must have shape (batch_size={want[0]}, decoding_seqlen={want[1]}), got "
                                f"{shape}")
        self.tokens.copy_(tokens, non_blocking=True)
        self._replay()
        self.cache.seqlen_offset += self.decoding_seqlen
        return self.logits


def graphed_decoder(model, batch_size: int, dtype: Optional[torch.dtype] = None,
                    state_dtype: Optional[torch.dtype] = None) -> GraphedDecoder:
    """A GraphedDecoder for `model`, kept on the model and reused by later calls with the same batch size, dtypes
    and weights (a moved or re-created parameter forces a new capture)."""
    check_graphable(model, batch_size)
    key = (batch_size, dtype, state_dtype, tuple(p.data_ptr() for p in model.parameters()))
    store = model.__dict__.setdefault("_graphed_decoders", {})
    decoder = store.get(key)
    if decoder is None:
        store.clear()  # one graph (and its memory pool) per model at a time
        decoder = store[key] = GraphedDecoder(model, batch_size, dtype=dtype, state_dtype=state_dtype)
    return decoder
