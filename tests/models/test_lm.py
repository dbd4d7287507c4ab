"""The Mamba LM: names, tying, prefill + steps = parallel forward, chunked prefill, generation, padding."""
from __future__ import annotations

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel
from tests.conftest import rel_err


MAMBA2 = {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16}
ARCHS = pytest.mark.parametrize("arch", ["mamba1", "mamba2", "hybrid"])


def tiny(arch: str = "mamba1", **kw) -> MambaLMHeadModel:
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layer=2, vocab_size=50, ssm_cfg=dict(MAMBA2) if arch == "mamba2" else {})
    if arch == "hybrid":  # Mamba-1 layer then an attention layer (mamba_ssm's attn_layer_idx)
        cfg.update(n_layer=3, attn_layer_idx=[1], attn_cfg={"num_heads": 4, "num_heads_kv": 2})
    cfg.update(kw)
    return MambaLMHeadModel(MambaConfig(**cfg)).eval()


def test_names_padding_and_tying():
    model = tiny()
    names = set(dict(model.named_parameters()))
    assert "backbone.embedding.weight" in names and "backbone.norm_f.weight" in names
    assert "backbone.layers.1.mixer.A_log" in names and "backbone.layers.0.norm.weight" in names
    assert model.backbone.embedding.weight.shape == (56, 32)  # 50 padded to a multiple of 8
    assert model.lm_head.weight is model.backbone.embedding.weight
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.backbone.embedding.weight


def test_dt_bias_survives_global_init():
    model = tiny()
    bias = model.backbone.layers[0].mixer.dt_proj.bias
    assert bias.abs().min() > 0  # not zeroed by the LM's init


@ARCHS
def test_prefill_then_steps_equal_parallel_forward(arch):
    model = tiny(arch, d_intermediate=48)
    ids = torch.randint(0, 50, (3, 41))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(3)
        pre = model(ids[:, :25], cache=cache).logits
        steps = [model.step(ids[:, t], cache) for t in range(25, 41)]
    out = torch.cat([pre, torch.stack(steps, 1)], 1)
    assert rel_err(out, full) <= 1e-5
    assert cache.seqlen_offset == 41


@ARCHS
def test_chunked_prefill_equals_one_forward(arch):
    model = tiny(arch)
    ids = torch.randint(0, 50, (2, 300))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2)
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 100), (100, 101), (101, 250), (250, 300))]
    assert rel_err(torch.cat(parts, 1), full) <= 1e-5


@ARCHS
def test_state_size_is_constant(arch):
    model = tiny(arch)
    cache = model.allocate_cache(1)
    if arch == "hybrid":
        pytest.skip("an attention layer's KV cache grows with the context by design")
    sizes = [s.ssm.numel() + s.conv.numel() for s in cache.states]
    with torch.no_grad():
        model(torch.randint(0, 50, (1, 500)), cache=cache)
        for _ in range(10):
            model.step(torch.tensor([1]), cache)
    assert [s.ssm.numel() + s.conv.numel() for s in cache.states] == sizes


@ARCHS
def test_generation_reproducible_and_greedy(arch):
    model = tiny(arch)
    prompt = torch.randint(0, 50, (2, 7))
    a = model.generate(prompt, 12, temperature=0.8, top_k=10, top_p=0.9, seed=3)
    b = model.generate(prompt, 12, temperature=0.8, top_k=10, top_p=0.9, seed=3)
    assert torch.equal(a, b) and a.shape == (2, 19) and torch.equal(a[:, :7], prompt)
    assert int(a.max()) < 50  # padded vocabulary entries are never sampled
    greedy = model.generate(prompt, 5, temperature=0)
    with torch.no_grad():
        ids = prompt
        for _ in range(5):
            ids = torch.cat([ids, model(ids).logits[:, -1, :50].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, ids)


def test_eos_stops_and_fills():
    model = tiny()
    prompt = torch.randint(0, 50, (1, 4))
    first = model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = model.generate(prompt, 6, temperature=0, eos_token_id=first)
    assert out.shape == (1, 10) and (out[0, 4:] == first).all()


@ARCHS
def test_left_padded_batch_equals_each_sequence_alone(arch):
    model = tiny(arch)
    seqs = [torch.randint(1, 50, (n,)) for n in (9, 4, 6)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        gen = model.generate(ids, 8, temperature=0, attention_mask=mask)
        for i, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            assert rel_err(batched[i, width - len(s):], alone) <= 1e-5
            assert torch.equal(gen[i, width:], model.generate(s[None], 8, temperature=0)[0, len(s):])


def test_bad_inputs():
    model = tiny()
    with pytest.raises(MambaKitError, match="input_ids"):
        model(torch.randint(0, 50, (5,)))
    with pytest.raises(MambaKitError, match=r"\[0, 56\)"):
        model(torch.tensor([[1, 99]]))
    with pytest.raises(MambaKitError, match="top_p"):
        model.generate(torch.tensor([[1]]), 2, top_p=0.0)
    with pytest.raises(MambaKitError, match="temperature"):
        model.generate(torch.tensor([[1]]), 2, temperature=-1)
    with pytest.raises(MambaKitError, match="attention_mask"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))


@ARCHS
def test_bf16_autocast_training_step(arch):
    model = tiny(arch)
    ids = torch.randint(0, 50, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
