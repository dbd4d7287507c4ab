"""The reference of `linear_cross_entropy`: the logits materialised, as a plain LM head + loss computes them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_cross_entropy_ref(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of the logits hidden @ weight.T over the tokens whose label is not ignore_index.

    hidden: (n_tokens, d); weight: (vocab, d); labels: (n_tokens,) integers. The logits go to the loss in float32
    (float64 for float64 logits, so that a float64 test compares at float64 precision). nan when every label is
    ignored (as torch)."""
    logits = F.linear(hidden, weight)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)
