"""The one-token decoding step of a Mamba LM captured in a CUDA graph.

An eager step launches several hundred small kernels (about 30 per layer) whose launch cost, not the GPU work, sets
the time per token at small batch. Captured once and replayed, the whole step is one launch. The recurrent state of a
Mamba LM has a fixed size whatever the context length, so one graph per batch size serves every position:

    decoder = GraphedDecoder(model, batch_size=16)      # static cache + token buffer, warm-up, capture
    logits = decoder.prefill(prompt_ids)                # (16, vocab) of the last prompt token; fills the static cache
    for _ in range(n):
        logits = decoder.step(logits.argmax(-1))        # copy the tokens in, replay the graph

`step` returns the graph's static output buffer: it is overwritten by the next `step`, so use (or clone) it first.
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


class GraphedDecoder:
    """A static inference cache and token buffer for `model` at `batch_size`, with `model.step` captured in a graph.

    dtype: the conv-state dtype (default: the model's); the SSM state is float32 as in eager decoding.
    warmup: eager steps run on a side stream before the capture (Triton compiles, cuBLAS picks its kernels).
    """

    def __init__(self, model, batch_size: int, dtype: Optional[torch.dtype] = None, warmup: int = 2):
        self.device = check_graphable(model, batch_size)
        if not isinstance(warmup, int) or warmup < 1:
            raise MambaKitError(f"warmup must be an integer >= 1, got {warmup!r}")
        self.model = model
        self.batch_size = batch_size
        self.vocab_size = model.config.padded_vocab_size
        with torch.cuda.device(self.device):
            self.cache = model.allocate_cache(batch_size, dtype=dtype, device=self.device)
            self.tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            self.graph = torch.cuda.CUDAGraph()
            self.logits = self._capture(warmup)
        self.reset()

    @torch.no_grad()
    def _capture(self, warmup: int) -> Tensor:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.model.step(self.tokens, self.cache)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(self.graph):
            logits = self.model.step(self.tokens, self.cache)
        torch.cuda.synchronize(self.device)
        return logits

    # ------------------------------------------------------------------------------------------------------------------
    @property
    def seqlen_offset(self) -> int:
        """Tokens seen since the last reset/prefill (prompt + decoded)."""
        return self.cache.seqlen_offset

    def reset(self) -> None:
        """Zero the static state (in place: the graph keeps pointing at the same tensors)."""
        for state in self.cache.states:
            for t in (vars(state).values() if state is not None else ()):  # None: a layer without a mixer
                if isinstance(t, Tensor):
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
        output (overwritten by the next step). Updates the static cache in place."""
        if tokens.numel() != self.batch_size or tokens.dim() > 2:
            raise MambaKitError(f"tokens must have shape (batch_size={self.batch_size},), got {tuple(tokens.shape)}")
        self.tokens.copy_(tokens.reshape(-1), non_blocking=True)
        self.graph.replay()
        self.cache.seqlen_offset += 1
        return self.logits


def graphed_decoder(model, batch_size: int, dtype: Optional[torch.dtype] = None) -> GraphedDecoder:
    """A GraphedDecoder for `model`, kept on the model and reused by later calls with the same batch size, dtype and
    weights (a moved or re-created parameter forces a new capture)."""
    check_graphable(model, batch_size)
    key = (batch_size, dtype, tuple(p.data_ptr() for p in model.parameters()))
    store = model.__dict__.setdefault("_graphed_decoders", {})
    decoder = store.get(key)
    if decoder is None:
        store.clear()  # one graph (and its memory pool) per model at a time
        decoder = store[key] = GraphedDecoder(model, batch_size, dtype=dtype)
    return decoder
