"""The Mamba language model: embedding -> n_layer x [residual + mixer(RMSNorm(residual))] -> RMSNorm -> LM head.

Module and parameter names follow `mamba_ssm.MambaLMHeadModel` (backbone.embedding, backbone.layers.{i}.norm,
backbone.layers.{i}.mixer.*, backbone.norm_f, lm_head), so its checkpoints map one to one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.norm import RMSNorm
from mambakit.layers.registry import mixer_spec
from mambakit.layers.state import allocate_mixer_state
from mambakit.layers.step import PreNorm, fp32_add_rms_norm, project_step
from mambakit.models.config import MambaConfig
from mambakit.ops.cpu_linear import use_cpu_linear
from mambakit.ops.loss import check_label_dtype, check_label_values, linear_cross_entropy
from mambakit.ops.norm import add_rms_norm


def _make_mixer(config: MambaConfig, layer_idx: int, device, dtype) -> nn.Module:
    """Layer `layer_idx`'s mixer: attention when listed in `attn_layer_idx`, else the `ssm_cfg` layer (registry)."""
    factory = {"device": device, "dtype": dtype}
    if layer_idx in config.attn_layer_idx:
        return mixer_spec("MHA").layer_class()(config.d_model, layer_idx=layer_idx, **config.attn_cfg, **factory)
    kwargs = {k: v for k, v in config.ssm_cfg.items() if k != "layer"}
    mixer_cls = mixer_spec(config.mixer_layer).layer_class()
    try:
        return mixer_cls(config.d_model, layer_idx=layer_idx, **kwargs, **factory)
    except TypeError as exc:
        raise MambaKitError(f"invalid ssm_cfg for {config.mixer_layer}: {exc}") from exc


def _make_norm(config: MambaConfig, device, dtype) -> nn.Module:
    """RMSNorm (the default) or LayerNorm with bias when config.rms_norm is False, as mamba_ssm."""
    if config.rms_norm:
        return RMSNorm(config.d_model, eps=config.norm_epsilon, device=device, dtype=dtype)
    return nn.LayerNorm(config.d_model, eps=config.norm_epsilon, device=device, dtype=dtype)


class GatedMLP(nn.Module):
    """fc2(y * silu(gate)) with (y, gate) = fc1(x); hidden width rounded up to a multiple of 128 (as mamba_ssm)."""

    def __init__(self, d_model: int, hidden: int, multiple_of: int = 128, device=None, dtype=None):
        super().__init__()
        hidden = (hidden + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, d_model, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


def _normed_dtype(hidden: Tensor, step: bool) -> Optional[torch.dtype]:
    """The dtype a pre-norm hands to the next projection: the CUDA autocast dtype under autocast (so that no cast
    kernel follows the norm), else None (the norm weight's dtype)."""
    if hidden.is_cuda and not step and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return None


class Block(nn.Module):
    """Pre-norm block with the residual carried separately: residual += hidden; hidden = mixer(norm(residual))."""

    def __init__(self, config: MambaConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = _make_norm(config, device, dtype)
        self.mixer = _make_mixer(config, layer_idx, device, dtype)
        if config.d_intermediate > 0:
            self.norm2 = _make_norm(config, device, dtype)
            self.mlp = GatedMLP(config.d_model, config.d_intermediate, device=device, dtype=dtype)
        else:
            self.mlp = None

    def _add_norm(self, hidden: Tensor, residual: Optional[Tensor], norm: nn.Module,
                  step: bool = False) -> tuple[Tensor, Tensor]:
        if isinstance(norm, RMSNorm):  # one fused kernel each way on CUDA, the PyTorch composition elsewhere
            return add_rms_norm(hidden, residual, norm.weight, norm.eps, self.residual_in_fp32,
                                out_dtype=_normed_dtype(hidden, step))
        residual = hidden if residual is None else residual + hidden
        normed = norm(residual.to(norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.float()
        return normed, residual

    def _fuses_step_norm(self) -> bool:
        """Whether a decoding step hands the add + RMSNorm to the mixer's step (`PreNorm`): an RMSNorm block without
        an MLP, a mixer whose step takes it, no autograd."""
        return (self.mlp is None and type(self.norm) is RMSNorm and not torch.is_grad_enabled()
                and getattr(self.mixer, "step_fuses_pre_norm", False))

    def forward(self, hidden: Tensor, residual: Optional[Tensor], state=None, step: bool = False,
                **mixer_kwargs) -> tuple[Tensor, Tensor]:
        """hidden, residual: (batch, seqlen, d_model) (residual None for the first block)."""
        if step and self._fuses_step_norm():  # decoding: the add + RMSNorm goes into the mixer's in_proj
            return self.mixer.step(hidden, state, pre_norm=PreNorm(residual, self.norm.weight, self.norm.eps,
                                                                   self.residual_in_fp32))
        normed, residual = self._add_norm(hidden, residual, self.norm, step)
        if step:
            hidden = self.mixer.step(normed, state)
        else:
            hidden = self.mixer(normed, state=state, **mixer_kwargs)
        if self.mlp is not None:
            normed, residual = self._add_norm(hidden, residual, self.norm2, step)
            hidden = self.mlp(normed)
        return hidden, residual


class MixerModel(nn.Module):
    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(config, i, device=device, dtype=dtype) for i in range(config.n_layer))
        self.norm_f = _make_norm(config, device, dtype)

    def forward(self, input_ids: Optional[Tensor], cache: Optional["InferenceCache"] = None, step: bool = False,
                inputs_embeds: Optional[Tensor] = None, **mixer_kwargs) -> Tensor:
        """input_ids: (batch, seqlen), or inputs_embeds: (batch, seqlen, d_model) in its place -> (batch, seqlen,
        d_model) after the final norm."""
        hidden = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for i, layer in enumerate(self.layers):
            state = cache.states[i] if cache is not None else None
            hidden, residual = layer(hidden, residual, state=state, step=step, **mixer_kwargs)
        if isinstance(self.norm_f, RMSNorm):
            if step and use_cpu_linear(hidden, self.norm_f.weight):  # a CPU 16-bit step keeps float32 to lm_head
                return fp32_add_rms_norm(hidden, residual, self.norm_f.weight, self.norm_f.eps)[0]
            return add_rms_norm(hidden, residual, self.norm_f.weight, self.norm_f.eps, residual_in_fp32=True,
                                out_dtype=_normed_dtype(hidden, step))[0]
        residual = hidden if residual is None else residual + hidden
        return self.norm_f(residual.to(self.norm_f.weight.dtype))


@dataclass
class CausalLMOutput:
    logits: Optional[Tensor]  # (batch, seqlen, padded_vocab_size); None from forward(return_logits=False)
    loss: Optional[Tensor] = None


@dataclass
class InferenceCache:
    """Per-layer recurrent states (constant size whatever the context length) and the number of tokens seen."""

    states: list[Any] = field(default_factory=list)
    seqlen_offset: int = 0

    def reorder(self, index: Tensor) -> None:
        for s in self.states:
            if s is not None:  # a layer without a mixer keeps no state
                s.reorder(index)


def _init_weights(module: nn.Module, n_layer: int, n_residuals_per_layer: int) -> None:
    """mamba_ssm's init: zero linear biases (except marked ones), N(0, 0.02) embeddings, out_proj/fc2 rescaled."""
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    for name in ("out_proj", "fc2"):
        sub = getattr(module, name, None)
        if isinstance(sub, nn.Linear):
            nn.init.kaiming_uniform_(sub.weight, a=math.sqrt(5))
            with torch.no_grad():
                sub.weight /= math.sqrt(n_residuals_per_layer * n_layer)


class CausalLM(nn.Module):
    """What every mambakit language model shares: input checks, forward with an optional cache, the one-token step
    and generation. A subclass builds `self.config` (with vocab_size, padded_vocab_size, d_model, tie_embeddings),
    `self.backbone` (embedding, layers; called as backbone(input_ids, cache=, step=, inputs_embeds=, mask=,
    seq_idx=) -> (batch, seqlen, d_model)) and `self.lm_head`, and defines `allocate_cache`.

    check_values: whether forward reads the values of input_ids, labels (return_logits=False) and attention_mask to
    check their ranges (a clear error instead of a device-side assert; the mixers check a mask's values again). On
    CUDA each read synchronises the host with the device, so that the host cannot queue the next step's kernels
    while the last ones run; a training loop whose data are known to be in range sets it False on the model
    (`mambakit train` does: bytes are always in range)."""

    config: Any
    check_values: bool = True

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    # ------------------------------------------------------------------------------------------------------------------
    def _check_ids(self, input_ids: Tensor) -> None:
        if input_ids.dim() != 2:
            raise MambaKitError(f"input_ids must have shape (batch, seqlen), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise MambaKitError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if not self.check_values or not input_ids.numel() or (input_ids.is_cuda
                                                             and torch.cuda.is_current_stream_capturing()):
            return  # a CUDA graph being captured cannot read values (mambakit.training.cuda_graph)
        lo, hi = (int(v) for v in torch.aminmax(input_ids))
        if lo < 0 or hi >= self.config.padded_vocab_size:
            raise MambaKitError(f"input_ids must lie in [0, {self.config.padded_vocab_size}), got values in "
                                f"[{lo}, {hi}]")

    def _check_embeds(self, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor]) -> Tensor:
        """Exactly one of the two; returns a (batch, seqlen) tensor of the inputs' shape for the other checks."""
        if (input_ids is None) == (inputs_embeds is None):
            raise MambaKitError("give exactly one of input_ids and inputs_embeds, got "
                                f"{'both' if input_ids is not None else 'neither'}")
        if input_ids is not None:
            self._check_ids(input_ids)
            return input_ids
        d = self.config.d_model
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != d:
            raise MambaKitError(f"inputs_embeds must have shape (batch, seqlen, d_model={d}), got "
                                f"{tuple(inputs_embeds.shape)}")
        return inputs_embeds[..., 0]

    def forward(self, input_ids: Optional[Tensor] = None, cache: Optional[InferenceCache] = None,
                labels: Optional[Tensor] = None, num_last_tokens: int = 0, seq_idx: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                return_logits: bool = True) -> CausalLMOutput:
        """input_ids: (batch, seqlen). cache: continue from it and update it (prefill or chunked prefill).
        labels: (batch, seqlen) next-token targets (-100 ignored) for a mean cross-entropy `loss`.
        return_logits=False (needs labels): logits None and the loss computed chunk by chunk without them
        (`mambakit.ops.loss.linear_cross_entropy`: the same value and gradients, none of the (batch, seqlen, vocab)
        logits, their float32 copy or their gradient in memory).
        seq_idx: (batch, seqlen) packed sequences. attention_mask: (batch, seqlen) 1 = token, 0 = padding.
        inputs_embeds: (batch, seqlen, d_model) vectors fed in place of the token embeddings (give it instead of
        input_ids; used by ReMamba)."""
        inputs_2d = self._check_embeds(input_ids, inputs_embeds)
        if not return_logits:  # before the forward: its errors come first, and no host sync waits for it
            self._check_fused_loss(labels, inputs_2d, num_last_tokens)
        kwargs = {}
        if seq_idx is not None:
            kwargs["seq_idx"] = seq_idx
        if attention_mask is not None:
            if attention_mask.shape != inputs_2d.shape:
                raise MambaKitError(f"attention_mask must have shape {tuple(inputs_2d.shape)} like the "
                                    f"inputs, got {tuple(attention_mask.shape)}")
            if attention_mask.dtype.is_complex or (self.check_values and not bool(
                    ((attention_mask == 0) | (attention_mask == 1)).all())):
                raise MambaKitError("attention_mask must hold only 0 (padding) and 1 (token)")
            kwargs["mask"] = attention_mask
        hidden = self.backbone(input_ids, cache=cache, inputs_embeds=inputs_embeds, **kwargs)
        if cache is not None:
            cache.seqlen_offset += inputs_2d.shape[1]
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        if not return_logits:
            loss = linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, labels.flatten(),
                                        ignore_index=-100, check_labels=False)
            return CausalLMOutput(logits=None, loss=loss)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)

    def _check_fused_loss(self, labels: Optional[Tensor], inputs_2d: Tensor, num_last_tokens: int) -> None:
        """What forward(return_logits=False) needs: labels (batch, seqlen of the logits) of integers in
        [0, padded_vocab_size) or -100, and a bias-free nn.Linear head."""
        if labels is None:
            raise MambaKitError("return_logits=False computes only the loss: give labels")
        if type(self.lm_head) is not nn.Linear or self.lm_head.bias is not None:
            raise MambaKitError(f"return_logits=False needs lm_head to be a bias-free nn.Linear, got "
                                f"{type(self.lm_head).__name__}")
        batch, seqlen = inputs_2d.shape
        shape = (batch, min(num_last_tokens, seqlen) if num_last_tokens > 0 else seqlen)
        if not isinstance(labels, Tensor) or labels.shape != shape:
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise MambaKitError(f"labels must have shape {shape} (batch, seqlen of the logits), got {got}")
        check_label_dtype(labels)
        if self.check_values:
            check_label_values(labels, self.lm_head.weight.shape[0])

    @torch.no_grad()
    def step(self, input_ids: Tensor, cache: InferenceCache) -> Tensor:
        """One decoding step. input_ids: (batch,) or (batch, 1). Returns logits (batch, padded_vocab_size)."""
        ids = input_ids.reshape(-1, 1)
        hidden = self.backbone(ids, cache=cache, step=True)
        cache.seqlen_offset += 1
        return project_step(self.lm_head, hidden[:, -1])

    @torch.no_grad()
    def decode_tokens(self, input_ids: Tensor, cache: InferenceCache) -> Tensor:
        """k decoding steps at once (speculative decoding, multi-token verification). input_ids: (batch, k), k >= 1,
        the tokens after those the cache has seen. Returns logits (batch, k, padded_vocab_size) and advances the
        cache by k tokens: the same as k calls of `step` (and as the full forward's logits at those positions).

        k == 1 is `step`; k > 1 is the forward from the cache (the chunked-prefill path every mixer has: it continues
        from the cached state and leaves the state after the last token)."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise MambaKitError(f"input_ids must have shape (batch, k >= 1) (k new tokens per row), got {shape}")
        if input_ids.shape[1] == 1:
            return self.step(input_ids, cache)[:, None]
        return self(input_ids, cache=cache).logits

    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
                 eos_token_id: Optional[int] = None, attention_mask: Optional[Tensor] = None,
                 cuda_graph: bool = False, state_dtype: Optional[torch.dtype] = None) -> Tensor:
        """Prefill the prompt, then decode one token at a time from the constant-size state.

        Returns (batch, seqlen + max_new_tokens) token ids (rows that hit eos_token_id are filled with it).
        temperature 0 (or top_k 1) is greedy. cuda_graph: replay the one-token step from a CUDA graph
        (`mambakit.models.cuda_graph`; CUDA and SSM-only models, else MambaKitError). state_dtype: the SSM states'
        dtype (default float32; see `MambaLMHeadModel.allocate_cache`).
        """
        from mambakit.models.generation import generate

        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, eos_token_id=eos_token_id,
                        attention_mask=attention_mask, cuda_graph=cuda_graph, state_dtype=state_dtype)


class MambaLMHeadModel(CausalLM):
    """Mamba language model. `model(input_ids).logits`: (batch, seqlen, padded_vocab_size)."""

    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.backbone = MixerModel(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        n_res = 1 if config.d_intermediate == 0 else 2
        self.apply(partial(_init_weights, n_layer=config.n_layer, n_residuals_per_layer=n_res))
        self.tie_weights()

    # from_pretrained(path, device, dtype) and save_pretrained(path, format) are attached by mambakit.models.io (the
    # checkpoint I/O package, above this module; `import mambakit` imports it): this module knows nothing about files.

    def allocate_cache(self, batch_size: int, dtype: Optional[torch.dtype] = None, device=None,
                       state_dtype: Optional[torch.dtype] = None) -> InferenceCache:
        """Zero decoding state of every layer for batch_size rows. dtype: the conv states' (default: the model's);
        state_dtype: the SSM states' (Mamba, Mamba2; default float32, float64 for a float64 model), e.g.
        torch.bfloat16 as mamba_ssm and transformers keep it for a bf16 model: half the bytes a step moves, the state
        rounded once per token (the arithmetic stays float32)."""
        states = [allocate_mixer_state(layer.mixer, batch_size, dtype, device, state_dtype)
                  for layer in self.backbone.layers]
        return InferenceCache(states=states)
