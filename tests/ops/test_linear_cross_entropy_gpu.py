"""GPU: linear_cross_entropy under bf16 autocast (fp32 weight, as in training) against the float64 reference at an
LM-head shape of several chunks, both gradients; and its peak memory far under the materialised logits'."""
from __future__ import annotations

import pytest
import torch

from mambakit.ops.loss import linear_cross_entropy, linear_cross_entropy_ref
from tests.conftest import rel_err

pytestmark = pytest.mark.gpu


def _inputs(n: int, d: int, vocab: int):
    g = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(n, d, generator=g, device="cuda").bfloat16().requires_grad_()
    weight = (torch.randn(vocab, d, generator=g, device="cuda") / d ** 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g, device="cuda")
    labels[::7] = -100
    return hidden, weight, labels


def test_bf16_autocast_matches_float64():
    hidden, weight, labels = _inputs(3001, 768, 50280)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=512)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref = linear_cross_entropy_ref(h64, w64, labels)
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    assert rel_err(loss, ref) < 1e-3
    assert rel_err(gh, rh) < 2e-2 and rel_err(gw, rw) < 2e-2


def test_peak_memory_is_one_chunk_not_the_logits():
    n, d, vocab = 8192, 768, 50280
    hidden, weight, labels = _inputs(n, d, vocab)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_fp32 = n * vocab * 4  # 1.65 GB: the plain loss holds about three of these (and the bf16 logits) at its peak
    # expected about 0.7 GB: one chunk's bf16 and fp32 logits, the fp32 weight gradient and the bf16 weight copies
    assert extra < logits_fp32, f"{extra / 2**20:.0f} MiB above the inputs"
