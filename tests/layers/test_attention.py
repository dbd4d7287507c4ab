"""The attention mixer against a naive causal softmax attention with rotary positions."""
from __future__ import annotations

import math

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.layers.attention import MHA, rotary
from tests.conftest import rel_err


def naive(m: MHA, x):
    batch, seqlen, _ = x.shape
    if m.separate_qkv:
        q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    else:
        q, k, v = torch.split(m.in_proj(x), [m.num_heads * m.head_dim, m.num_heads_kv * m.head_dim,
                                             m.num_heads_kv * m.head_dim], dim=-1)
    q, k, v = (t.view(batch, seqlen, -1, m.head_dim).transpose(1, 2) for t in (q, k, v))
    pos = torch.arange(seqlen).expand(batch, seqlen)
    q, k = rotary(q, pos, m.rotary_emb_dim, m.rotary_emb_base), rotary(k, pos, m.rotary_emb_dim, m.rotary_emb_base)
    rep = m.num_heads // m.num_heads_kv
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scale = m.softmax_scale if m.softmax_scale is not None else 1 / math.sqrt(m.head_dim)
    scores = q @ k.transpose(-1, -2) * scale
    scores = scores.masked_fill(torch.ones(seqlen, seqlen, dtype=torch.bool).triu(1), float("-inf"))
    return m.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seqlen, -1))


@pytest.mark.parametrize("heads,heads_kv,rot", [(4, 4, None), (4, 2, 4), (2, 1, 0)])
def test_matches_naive_attention_and_cache(heads, heads_kv, rot):
    torch.manual_seed(0)
    m = MHA(32, num_heads=heads, num_heads_kv=heads_kv, rotary_emb_dim=rot).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    full = m(x)
    assert rel_err(full, naive(m, x)) < 1e-12
    state = m.allocate_state(2, dtype=torch.float64)
    parts = [m(x[:, :6], state=state)] + [m.step(x[:, t:t + 1], state) for t in range(6, 11)]
    assert rel_err(torch.cat(parts, 1), full) < 1e-12


@pytest.mark.parametrize("rot,scale", [(None, 0.3), (2, None), (0, 1.7)])
def test_separate_qkv_gqa_and_softmax_scale_match_naive(rot, scale):
    """The layout of transformers' hybrids: q_proj / k_proj / v_proj, head_dim != d_model / heads, a given scale."""
    torch.manual_seed(1)
    m = MHA(24, num_heads=6, num_heads_kv=2, head_dim=6, rotary_emb_dim=rot, separate_qkv=True,
            softmax_scale=scale, qkv_proj_bias=False).double()
    assert not hasattr(m, "in_proj") and m.k_proj.weight.shape == (12, 24)
    x = torch.randn(3, 9, 24, dtype=torch.float64, requires_grad=True)
    full = m(x)
    ref = naive(m, x)
    assert rel_err(full, ref) < 1e-12
    g = torch.randn_like(full)
    grads = torch.autograd.grad(full, [x, m.q_proj.weight], g)
    want = torch.autograd.grad(ref, [x, m.q_proj.weight], g)
    assert all(rel_err(a, b) < 1e-10 for a, b in zip(grads, want))
    state = m.allocate_state(3, dtype=torch.float64)
    with torch.no_grad():
        parts = [m(x[:, :4], state=state)] + [m.step(x[:, t], state)[:, None] for t in range(4, 9)]
    assert rel_err(torch.cat(parts, 1), full) < 1e-12


def test_bad_config():
    with pytest.raises(MambaKitError, match="softmax_scale"):
        MHA(32, num_heads=4, softmax_scale=-1.0)
    with pytest.raises(MambaKitError, match="num_heads_kv"):
        MHA(32, num_heads=4, num_heads_kv=3)
    with pytest.raises(MambaKitError, match="divisible"):
        MHA(30, num_heads=4)
