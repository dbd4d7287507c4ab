"""Linear + cross-entropy over chunks of tokens, the gradients computed in the forward: no logits are kept.

One chunk of c tokens (compute dtype `cdt`: the autocast dtype or the inputs' dtype; `acc`: float32, float64 for
float64)::

    logits = h @ w.T                                   (c, vocab) cdt
    logp = log_softmax(logits, dtype=acc)              (c, vocab) acc
    loss_sum += -sum(logp[i, label_i] over valid i)
    g = exp(logp) - onehot(label)                      (c, vocab) cdt (written over the logits' memory)
    grad_h[chunk] = valid * (g @ w)                    (c, d) hidden's dtype
    grad_w_acc += g.T @ (valid * h)                    (vocab, d) acc

The mean's 1 / n_valid (and the upstream gradient) is applied once, in the backward, to the two small results.
The working memory is one chunk's logits: cdt + acc + (c, vocab) transients of log_softmax.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mambakit.ops.autocast import autocast_off

#: float32 logits elements per chunk by default: 2**26 = 256 MB (about 0.6 GB of working memory with a bf16 head)
CHUNK_ELEMENTS = 2 ** 26


def default_chunk_tokens(n_tokens: int, vocab: int) -> int:
    """Tokens per chunk: at most max(1, CHUNK_ELEMENTS // vocab), the chunks made equal (no small last chunk)."""
    most = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    n_chunks = max(1, -(-n_tokens // most))
    return max(1, -(-n_tokens // n_chunks))


def acc_dtype(cdt: torch.dtype) -> torch.dtype:
    """The dtype of the softmax, the loss and the weight-gradient sum: float64 for float64, else float32."""
    return torch.float64 if cdt == torch.float64 else torch.float32


def chunked_loss_and_grads(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, chunk: int,
                           cdt: torch.dtype, grad_hidden: bool, grad_weight: bool
                           ) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(loss_sum, n_valid, grad_h, grad_w_sum): the summed loss and the count of valid tokens (acc dtype scalars),
    and the gradients of loss_sum (not of the mean) when asked: grad_h (n_tokens, d) in hidden's dtype, grad_w_sum
    (vocab, d) in the acc dtype. labels: (n_tokens,) int64; chunk: tokens per chunk."""
    acc = acc_dtype(cdt)
    n, d = hidden.shape
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0)
    n_valid = valid.sum().to(acc)
    w = weight.to(cdt)
    loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
    gh = torch.empty(n, d, dtype=hidden.dtype, device=hidden.device) if grad_hidden else None
    gw = torch.zeros(w.shape, dtype=acc, device=hidden.device) if grad_weight else None
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h = hidden[start:end].to(cdt)
        t = target[start:end, None]
        v = valid[start:end, None]
        logits = h @ w.T
        logp = torch.log_softmax(logits, dim=-1, dtype=acc)
        picked = logp.gather(1, t)  # (c, 1)
        loss_sum = loss_sum - torch.where(v, picked, 0).sum()
        if gh is None and gw is None:
            continue
        g = torch.exp(logp, out=logits)  # the softmax, in cdt, over the logits' memory
        del logp
        g.scatter_(1, t, (picked.exp() - 1).to(cdt))  # the target's p - 1 computed in acc, rounded once
        if gh is not None:
            gh[start:end] = torch.where(v, g @ w, 0)
        if gw is not None:
            hv = torch.where(v, h, 0)
            if cdt == acc:
                gw.addmm_(g.T, hv)
            else:
                gw += g.T @ hv
    return loss_sum, n_valid, gh, gw


class LinearCrossEntropy(torch.autograd.Function):
    """loss = mean cross-entropy of hidden @ weight.T; the gradients come from the forward (see the module)."""

    @staticmethod
    @autocast_off
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, chunk: int,
                cdt: torch.dtype) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_sum, n_valid, gh, gw = chunked_loss_and_grads(hidden, weight, labels, ignore_index, chunk, cdt,
                                                           need_h, need_w)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(gh, gw, n_valid)
        return loss_sum / n_valid  # nan when every label is ignored, as torch

    @staticmethod
    @once_differentiable  # the saved gradients are constants: no second derivative through them
    def backward(ctx, grad_out: Tensor):
        gh, gw, n_valid = ctx.saved_tensors
        scale = grad_out.to(n_valid.dtype) / n_valid.clamp(min=1)  # all ignored: zero gradients, as torch
        grad_h = (gh.to(scale.dtype) * scale).to(gh.dtype) if gh is not None else None
        grad_w = (gw * scale).to(ctx.weight_dtype) if gw is not None else None
        return grad_h, grad_w, None, None, None, None
