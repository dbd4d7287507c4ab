"""The layers of Falcon-H1 (parallel attention + narrow Mamba-2, µP multipliers) and Zamba2 (shared blocks with
per-use adapters) on their own: the math of the pieces against plain compositions, the one-token step against the
forward, and the refusals (CPU, float64 so that the compositions agree to rounding)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mambakit.errors import MambaKitError
from mambakit.layers.parallel_mixer import NarrowMamba2, ParallelMixer, ScaledLinear
from mambakit.layers.shared_block import SharedBlock, UseAdapters
from tests.conftest import rel_err

F64 = dict(dtype=torch.float64)


def test_scaled_linear_scales_each_run_of_outputs():
    torch.manual_seed(0)
    lin = ScaledLinear(5, 7, True, [(3, 0.5), (0, 9.0), (4, -2.0)], **F64)
    x = torch.randn(2, 3, 5, **F64)
    plain = x @ lin.weight.t() + lin.bias
    want = torch.cat([plain[..., :3] * 0.5, plain[..., 3:] * -2.0], -1)
    assert rel_err(lin(x), want) <= 1e-12
    with pytest.raises(MambaKitError, match="must cover out_features=7"):
        ScaledLinear(5, 7, False, [(3, 1.0)])


def test_narrow_mamba2_steps_equal_its_forward_and_refuses_bad_multipliers():
    torch.manual_seed(1)
    m = NarrowMamba2(16, 20, ssm_multipliers=(0.5, 1.5, 0.8, 1.2, 0.7), out_proj_bias=True, d_state=4, headdim=5,
                     ngroups=2, chunk_size=8, rmsnorm=True, norm_before_gate=True, **F64)
    assert (m.d_model, m.d_inner, m.nheads) == (16, 20, 4) and m.in_proj.bias is None and m.out_proj.bias is not None
    x = torch.randn(2, 11, 16, **F64)
    with torch.no_grad():
        full = m(x)
        state = m.allocate_state(2)
        steps = torch.cat([m.step(x[:, t:t + 1], state) for t in range(11)], 1)
    assert full.shape == (2, 11, 16) and rel_err(steps, full) <= 1e-10
    with pytest.raises(MambaKitError, match="ssm_multipliers must hold 5"):
        NarrowMamba2(16, 20, ssm_multipliers=(1.0, 2.0), headdim=5)


def test_parallel_mixer_sums_its_scaled_branches():
    torch.manual_seed(2)
    mixer = ParallelMixer(12, dict(num_heads=3, num_heads_kv=1, separate_qkv=True, qkv_proj_bias=False),
                          dict(d_state=4, headdim=4, chunk_size=8, rmsnorm=False), d_ssm=8, key_multiplier=0.6,
                          attention_in_multiplier=1.3, attention_out_multiplier=0.7, ssm_in_multiplier=0.9,
                          ssm_out_multiplier=1.1, **F64)
    x = torch.randn(2, 9, 12, **F64)
    with torch.no_grad():
        got = mixer(x)
        k = mixer.attn.k_proj
        assert rel_err(k(x), 0.6 * (x @ k.weight.t())) <= 1e-12
        want = 1.1 * mixer.mamba(0.9 * x) + 0.7 * mixer.attn(1.3 * x)
        state = mixer.allocate_state(2)
        steps = torch.cat([mixer.step(x[:, t:t + 1], state) for t in range(9)], 1)
    assert rel_err(got, want) <= 1e-12 and rel_err(steps, got) <= 1e-10
    with pytest.raises(MambaKitError, match="separate_qkv"):
        ParallelMixer(12, dict(num_heads=3), dict(d_state=4, headdim=4), d_ssm=8)


def test_shared_block_adds_each_uses_adapters_and_nothing_else():
    torch.manual_seed(3)
    block = SharedBlock(8, num_heads=2, d_intermediate=6, **F64)
    a, b = (UseAdapters(8, 3, 6, attention=True, **F64) for _ in range(2))
    h, e = torch.randn(2, 5, 8, **F64), torch.randn(2, 5, 8, **F64)
    with torch.no_grad():
        plain, with_a, with_b = block(h, e), block(h, e, a), block(h, e, b)
        x = block.norm(torch.cat([h, e], -1))
        q = block.attn.q_proj.weight
        assert rel_err(block.attn.q_proj(x), x @ q.t()) <= 1e-12  # no adapter left installed after a call
    assert with_a.shape == (2, 5, 8) and rel_err(with_a, plain) > 1e-3 and rel_err(with_a, with_b) > 1e-3
    block.attn.q_proj = nn.Linear(16, 16, **F64)
    with pytest.raises(MambaKitError, match="must stay an AdaptedLinear"):
        block(h, e, a)
    with pytest.raises(MambaKitError, match="num_heads must divide 2 \\* d_model = 16"):
        SharedBlock(8, num_heads=3, d_intermediate=6)
