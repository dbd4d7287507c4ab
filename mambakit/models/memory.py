"""Memory a model of a config needs, estimated before anything is allocated, and the check against the machine.

The estimate is a LOWER bound, from the largest terms only, so that it never refuses a run that fits; a config
or flag of absurd size (d_model 10**7, n_layer 10**6, batch 10**9) still exceeds any machine by orders of magnitude
and is refused with one clear message instead of an allocation that fails after minutes (or swaps the machine).

Parameters (``d`` = d_model, ``e`` = the mixer's expand (default 2), ``V`` = the padded vocabulary)::

    P >= V*d                       the embedding (the LM head too when it is not tied: another V*d)
       + per SSM layer   3*e*d*d   in_proj (at least 2*e*d*d: x and the gate) and out_proj (e*d*d)
       + per MHA layer   2*d*d     the query and output projections
       + per MLP         2*d*d_intermediate
       + per layer       d         its norm

Training (``w`` bytes per parameter, 4 for float32 master weights; ``b`` micro-batch, ``T`` seq_len, ``a`` bytes
per activation, 2 under bf16 autocast, else 4; parameters, gradients and AdamW's two moments divided over
``shards`` ranks under FSDP)::

    bytes >= 4*P*w / shards                    weights, gradients, exp_avg, exp_avg_sq
           + b*T*a * n_layer*(d + 2*e*d)       per layer: its input and in_proj's output, kept for backward
           + b*T*V*4                           the float32 logits of the loss (with fused_loss, the loss
                                               without logits: one chunk's, c*V*4, c = `default_chunk_tokens`)

Available memory: ``torch.cuda.mem_get_info`` (free bytes) for a CUDA device; MemAvailable of /proc/meminfo, or
``os.sysconf`` available pages times the page size, for the CPU; None (no check) where neither can be read.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from mambakit.errors import MambaKitError
from mambakit.models.config import MambaConfig
from mambakit.ops.loss import default_chunk_tokens

__all__ = ["available_bytes", "check_fits", "format_bytes", "parameter_count", "training_bytes"]


def _expand(config: MambaConfig) -> int:
    expand = config.ssm_cfg.get("expand", 2)
    return expand if isinstance(expand, int) and not isinstance(expand, bool) and expand > 0 else 1


def parameter_count(config: MambaConfig) -> int:
    """A lower bound on the number of parameters of ``MambaLMHeadModel(config)`` (the formula of the module)."""
    d, V = config.d_model, config.padded_vocab_size
    n_attn = len({i for i in config.attn_layer_idx if isinstance(i, int) and 0 <= i < config.n_layer})
    n_ssm = config.n_layer - n_attn
    count = V * d * (1 if config.tie_embeddings else 2)
    count += n_ssm * 3 * _expand(config) * d * d + n_attn * 2 * d * d
    count += config.n_layer * (2 * d * config.d_intermediate + d)
    return count


def training_bytes(config: MambaConfig, micro_batch: int, seq_len: int, bf16: bool = False,
                   shards: int = 1, fused_loss: bool = False) -> int:
    """A lower bound on the bytes one rank needs to train ``config`` with AdamW (the formula of the module).
    fused_loss: the loss is computed without the logits (`forward(return_logits=False)`)."""
    d = config.d_model
    states = 4 * parameter_count(config) * 4 // max(1, shards)
    tokens = micro_batch * seq_len
    activations = tokens * (2 if bf16 else 4) * config.n_layer * (d + 2 * _expand(config) * d)
    V = config.padded_vocab_size
    loss_tokens = min(tokens, default_chunk_tokens(tokens, V)) if fused_loss else tokens
    return states + activations + loss_tokens * V * 4


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes(device: Union[str, torch.device]) -> Optional[int]:
    """Free memory of ``device`` in bytes (see the module), or None when it cannot be told (no check then)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    if device.type == "cpu":
        return _meminfo_available()
    return None


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units up to EB, then in EB)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} EB"


def check_fits(need: int, device: Union[str, torch.device], what: str, hint: str = "",
               available: Optional[int] = None) -> None:
    """Raise MambaKitError when ``need`` bytes exceed the free memory of ``device`` (``available`` overrides the
    measurement: for tests). ``what`` says what needs them; ``hint`` which flags or fields to lower."""
    free = available_bytes(device) if available is None else available
    if free is None or need <= free:
        return
    raise MambaKitError(f"{what} needs at least {format_bytes(need)} but {torch.device(device)} has "
                        f"{format_bytes(free)} available" + (f"; {hint}" if hint else ""))
