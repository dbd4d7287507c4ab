"""CausalLM.decode_tokens: k new tokens per row from the cache at once equal k one-token steps and the full forward's
logits at those positions, for every architecture with a decoding cache (Mamba-1, Mamba-2, Mamba-3, S4, a Mamba LM
with attention layers, hybrid stacks: attention, MLPs, parallel mixers, MoE, shared blocks), and leave the cache where
k steps leave it."""
from __future__ import annotations

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.models.config import MambaConfig
from mambakit.models.hybrid import HybridConfig, HybridLM
from mambakit.models.lm import MambaLMHeadModel
from tests.conftest import rel_err

VOCAB, PROMPT = 37, 6
M2 = {"d_state": 8, "headdim": 8, "chunk_size": 4}
ATTN = {"num_heads": 4, "num_heads_kv": 2}
SSM = {"mamba1": {"d_state": 4}, "mamba2": {"layer": "Mamba2", **M2}, "mamba3": {"layer": "Mamba3", **M2},
       "s4": {"layer": "S4", "d_state": 8}}
HYBRIDS = {  # Mamba-2 + gated MLP, attention (GQA), Mamba-1 + plain MLP
    "hybrid": dict(layers=[{"mixer": "mamba2", "mlp": "gated"}, {"mixer": "attention", "mlp": None},
                           {"mixer": "mamba", "mlp": "plain"}], mamba2=M2, mamba={"d_state": 4}, attention=ATTN,
                   mlp={"d_intermediate": 48}),
    # attention and Mamba-2 side by side (Falcon-H1), a shared-expert MoE and a routed one
    "parallel_moe": dict(layers=[{"mixer": "parallel", "mlp": "moe"}, {"mixer": "mamba2", "mlp": "routed"}],
                         mamba2=M2, attention=dict(ATTN, separate_qkv=True), mlp={"d_intermediate": 48},
                         moe={"d_intermediate": 16, "num_experts": 4, "top_k": 2}),
    # a shared attention block used by two Mamba-2 layers (Zamba-2), with its own KV cache per use
    "shared_block": dict(layers=[{"mixer": "mamba2", "mlp": None, "shared": 0}, {"mixer": "mamba2", "mlp": None},
                                 {"mixer": "mamba2", "mlp": None, "shared": 0}], mamba2=M2,
                         shared={"num_blocks": 1, "num_heads": 4, "d_intermediate": 48, "adapter_rank": 2}),
}
ARCHS = ["mamba1", "mamba2", "mamba3", "s4", "attention", *HYBRIDS]


def build(arch: str, dtype=torch.float64):
    torch.manual_seed(0)
    if arch in HYBRIDS:
        return HybridLM(HybridConfig(d_model=32, vocab_size=VOCAB, **HYBRIDS[arch])).to(dtype).eval()
    kw = dict(d_model=32, n_layer=2, vocab_size=VOCAB, ssm_cfg=dict(SSM.get(arch, SSM["mamba1"])))
    if arch == "attention":
        kw.update(n_layer=3, attn_layer_idx=[1], attn_cfg=ATTN)
    return MambaLMHeadModel(MambaConfig(**kw)).to(dtype).eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_k_tokens_equal_k_steps_and_the_full_forward(arch, batch, k):
    model = build(arch)
    ids = torch.randint(0, VOCAB, (batch, PROMPT + k + 3), generator=torch.Generator().manual_seed(batch * 10 + k))
    with torch.no_grad():
        full = model(ids).logits
        many, steps = model.allocate_cache(batch), model.allocate_cache(batch)
        model(ids[:, :PROMPT], cache=many)
        model(ids[:, :PROMPT], cache=steps)
        got = model.decode_tokens(ids[:, PROMPT:PROMPT + k], many)
        stepped = torch.stack([model.step(ids[:, t], steps) for t in range(PROMPT, PROMPT + k)], 1)
    assert got.shape == (batch, k, model.config.padded_vocab_size)
    assert many.seqlen_offset == steps.seqlen_offset == PROMPT + k
    assert rel_err(got, full[:, PROMPT:PROMPT + k]) < 1e-12
    assert rel_err(got, stepped) < 1e-12
    # the cache continues where k steps leave it: 3 more tokens at once, then one step
    nxt = model.decode_tokens(ids[:, PROMPT + k:PROMPT + k + 3], many)
    assert rel_err(nxt, full[:, PROMPT + k:]) < 1e-12
    assert rel_err(model.step(ids[:, PROMPT + k], steps), full[:, PROMPT + k]) < 1e-12


@pytest.mark.parametrize("arch", ["mamba1", "mamba2", "mamba3"])
def test_float32_k_tokens_from_an_empty_cache(arch):
    """Float32, and k tokens as the very first call (no prompt): the forward from a zero state."""
    model = build(arch, torch.float32)
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(3)
        got = torch.cat([model.decode_tokens(ids[:, :4], cache), model.decode_tokens(ids[:, 4:5], cache),
                         model.decode_tokens(ids[:, 5:], cache)], 1)
    assert rel_err(got, full) < 1e-5 and cache.seqlen_offset == 9


@pytest.mark.parametrize("bad", [torch.zeros(3, dtype=torch.long), torch.zeros(3, 0, dtype=torch.long),
                                 torch.zeros(1, 2, 3, dtype=torch.long), [[1, 2]]],
                         ids=["1-D", "k=0", "3-D", "list"])
def test_bad_tokens_are_refused(bad):
    model = build("mamba1")
    with pytest.raises(MambaKitError, match=r"input_ids must have shape \(batch, k >= 1\)"):
        model.decode_tokens(bad, model.allocate_cache(3))


def test_out_of_vocabulary_tokens_are_refused():
    model = build("mamba2")
    with pytest.raises(MambaKitError, match="input_ids must lie in"):
        model.decode_tokens(torch.full((2, 3), VOCAB + 5), model.allocate_cache(2))
