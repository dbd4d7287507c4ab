"""The LM loss without the logits: `linear_cross_entropy(hidden, weight, labels)` is the mean cross-entropy of
hidden @ weight.T, computed over chunks of tokens with the gradients of hidden and weight made in the forward, so
that the (n_tokens, vocab) logits, their float32 copy and their gradient never exist at once (`chunked`); the
reference materialises them (`naive`). Plain PyTorch: cuBLAS on CUDA, any device.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mambakit.errors import MambaKitError
from mambakit.ops.checks import require_tensors
from mambakit.ops.loss.chunked import (
    CHUNK_ELEMENTS,
    LinearCrossEntropy,
    chunked_loss_and_grads,
    default_chunk_tokens,
)
from mambakit.ops.loss.naive import linear_cross_entropy_ref

__all__ = ["CHUNK_ELEMENTS", "check_label_dtype", "check_label_values", "compute_dtype", "default_chunk_tokens",
           "linear_cross_entropy", "linear_cross_entropy_ref"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of the logits' product, the one F.linear(hidden, weight) would use: the autocast dtype of hidden's
    device inside an autocast region (float64 inputs are not cast), else the inputs' (one) dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(device)
    if hidden.dtype != weight.dtype:
        raise MambaKitError(f"hidden and weight must have one dtype outside autocast, got hidden {hidden.dtype} and "
                            f"weight {weight.dtype}")
    return hidden.dtype


def _check(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, chunk_tokens: Optional[int]) -> None:
    require_tensors(hidden=hidden, weight=weight, labels=labels)
    if hidden.dim() != 2:
        raise MambaKitError(f"hidden must have shape (n_tokens, d), got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
        raise MambaKitError(f"weight must have shape (vocab >= 1, d={hidden.shape[1]}), got {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise MambaKitError(f"labels must have shape (n_tokens={hidden.shape[0]},), got {tuple(labels.shape)}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in _FLOATS:
            raise MambaKitError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    check_label_dtype(labels)
    if weight.device != hidden.device or labels.device != hidden.device:
        raise MambaKitError(f"hidden, weight and labels must be on one device, got {hidden.device}, {weight.device} "
                            f"and {labels.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise MambaKitError(f"ignore_index must be an integer, got {ignore_index!r}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise MambaKitError(f"chunk_tokens must be a positive integer or None, got {chunk_tokens!r}")


def check_label_dtype(labels: Tensor) -> None:
    """MambaKitError unless labels is an integer (not bool) tensor."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise MambaKitError(f"labels must be an integer tensor, got dtype {labels.dtype}")


def check_label_values(labels: Tensor, vocab: int, ignore_index: int = -100) -> None:
    """MambaKitError unless every label lies in [0, vocab) or is ignore_index. Reads the values (one host sync);
    skipped while a CUDA graph is being captured (`mambakit.training.cuda_graph`), which cannot read them."""
    if not labels.numel() or (labels.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = (int(v) for v in torch.aminmax(torch.where(labels == ignore_index, 0, labels)))  # 0 is a label
    if lo < 0 or hi >= vocab:
        raise MambaKitError(f"labels must lie in [0, vocab={vocab}) or be ignore_index={ignore_index}, got values "
                            f"in [{lo}, {hi}]")


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, ignore_index: int = -100,
                         chunk_tokens: Optional[int] = None, check_labels: bool = True) -> Tensor:
    """Mean cross-entropy of the logits hidden @ weight.T over the tokens whose label is not ignore_index, without
    materialising the logits: F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=ignore_index)
    to float rounding (nan when every label is ignored, with zero gradients, as torch).

    hidden: (n_tokens, d); weight: (vocab, d) (an LM head, possibly tied to the embedding); labels: (n_tokens,)
    integers in [0, vocab) or ignore_index. The product runs in `compute_dtype` (the autocast dtype under
    autocast), the softmax and the loss in float32 (float64 for float64 inputs). chunk_tokens: tokens per chunk
    (None: `default_chunk_tokens`, about 256 MB of float32 logits per chunk). check_labels=False skips
    `check_label_values` (a caller that checked them before its forward; a label out of range then fails in the
    gather: a device-side assert on CUDA). Returns a scalar in float32 (float64).

    With autograd the gradients of hidden and weight (only those that require grad) are computed in the forward
    and held until the backward: (n_tokens, d) in hidden's dtype and (vocab, d) in float32 (float64).
    """
    _check(hidden, weight, labels, ignore_index, chunk_tokens)
    if check_labels:
        check_label_values(labels, weight.shape[0], ignore_index)
    cdt = compute_dtype(hidden, weight)
    chunk = chunk_tokens if chunk_tokens is not None else default_chunk_tokens(hidden.shape[0], weight.shape[0])
    labels = labels.long()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk, cdt)
    with torch.autocast(hidden.device.type, enabled=False):
        loss_sum, n_valid, _, _ = chunked_loss_and_grads(hidden, weight, labels, ignore_index, chunk, cdt,
                                                         False, False)
    return loss_sum / n_valid
