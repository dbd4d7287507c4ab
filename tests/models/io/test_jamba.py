"""Jamba (transformers model_type "jamba": Mamba-1 with learned dt / B / C norms + grouped-query attention + routed
experts every so many layers) against transformers: loading, logits, greedy generation, the per-layer cache,
chunked prefill, saving back and refusals (CPU, fp32, tiny random models built by transformers itself)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "JambaForCausalLM"):
    pytest.skip("this transformers has no Jamba", allow_module_level=True)

from mambakit.errors import CheckpointError  # noqa: E402
from mambakit.layers.attention import KVState  # noqa: E402
from mambakit.layers.moe import TopKMoE  # noqa: E402
from mambakit.layers.state import SSMState  # noqa: E402
from mambakit.models.hybrid import HybridLM  # noqa: E402
from mambakit.models.io import from_pretrained, save_pretrained  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.models.io.hybrid_helpers import hf_generate, round_trip, save_cases  # noqa: E402
from tests.models.test_pretrained import ids_for, perturb_  # noqa: E402
from tests.models.test_pretrained import our_logits as logits  # noqa: E402

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")

TOL = 1e-5
_BASE = dict(hidden_size=32, intermediate_size=24, num_attention_heads=4, mamba_d_state=8)
CASES = {
    # attention at 1, 3 (GQA 4:2); 4 experts top 2 at 1, 3; dense MLPs at 0, 2; untied; dt_rank given
    "moe": dict(_BASE, vocab_size=61, num_hidden_layers=4, num_key_value_heads=2, attn_layer_period=2,
                attn_layer_offset=1, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
                expert_layer_offset=1, mamba_dt_rank=5),
    # attention at 0 with one KV head, experts at 2 (top 1 of 3), tied, projection biases, no conv bias, d_conv 3,
    # dt_rank "auto", another epsilon
    "tied-bias": dict(_BASE, vocab_size=47, num_hidden_layers=3, num_key_value_heads=1, attn_layer_period=3,
                      attn_layer_offset=0, num_experts=3, num_experts_per_tok=1, expert_layer_period=3,
                      expert_layer_offset=2, tie_word_embeddings=True, mamba_proj_bias=True, mamba_conv_bias=False,
                      mamba_d_conv=3, rms_norm_eps=1e-4),
}


def hf_jamba(case: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.JambaForCausalLM(transformers.JambaConfig(**{**CASES[case], **overrides}))
    return perturb_(model, seed + 1).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_cases(hf_jamba, CASES, tmp_path_factory)


@pytest.mark.parametrize("case", list(CASES))
def test_jamba_loads_with_same_logits_and_greedy_tokens(case, saved):
    ref, folder = saved[case]
    model = from_pretrained(folder)
    assert isinstance(model, HybridLM)
    kinds = [(s["mixer"], s["mlp"]) for s in model.config.layers]
    want_kinds = [("attention" if t == "attention" else "mamba", "routed" if n > 1 else "gated")
                  for t, n in zip(ref.config.layers_block_type, ref.config.layers_num_experts)]
    assert kinds == want_kinds and {"mamba", "attention"} <= {k[0] for k in kinds} and {"gated", "routed"} <= \
        {k[1] for k in kinds}
    assert any(isinstance(layer.mlp, TopKMoE) for layer in model.backbone.layers)
    ids = ids_for(ref.config.vocab_size, seqlen=21)
    assert rel_err(logits(model, ids), logits(ref, ids)) <= TOL
    prompt = ids[:1, :7]
    want = hf_generate(ref, prompt)
    assert model.generate(prompt, want.shape[1] - prompt.shape[1], temperature=0).tolist() == want.tolist()


def test_jamba_cache_holds_each_layers_state_and_chunked_prefill_equals_forward(saved):
    ref, folder = saved["moe"]
    model = from_pretrained(folder)
    ids = ids_for(ref.config.vocab_size, seqlen=17, seed=2)
    full = logits(model, ids)
    cache = model.allocate_cache(2)
    with torch.no_grad():
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 5), (5, 6), (6, 13), (13, 17))]
    assert rel_err(torch.cat(parts, dim=1), full) <= TOL
    assert [type(s) for s in cache.states] == [SSMState, KVState, SSMState, KVState] and cache.seqlen_offset == 17
    with torch.no_grad():  # one-token steps (the learned norms in the decode step) continue the same computation
        step = model.step(ids[:, 0], cache)
        again = logits(model, torch.cat([ids, ids[:, :1]], dim=1))[:, -1]
    assert rel_err(step, again) <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_jamba_saves_for_transformers(case, saved, tmp_path):
    ref, folder = saved[case]
    raw = round_trip(ref, folder, tmp_path / "out", seqlen=15)
    for key in ("attn_layer_period", "attn_layer_offset", "num_experts", "num_experts_per_tok", "mamba_dt_rank"):
        assert raw[key] == getattr(ref.config, key)


def test_jamba_without_experts_saves_as_dense(tmp_path):
    ref = hf_jamba("moe", num_experts=1)  # num_experts_per_tok stays 2, unread
    ref.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    assert all(s["mlp"] == "gated" for s in model.config.layers)
    round_trip(ref, tmp_path / "hf", tmp_path / "out", seqlen=9)
    model.backbone.layers[0].mixer.dt_norm_weight = None  # weightless norms: Falcon-Mamba's, not Jamba's
    with pytest.raises(CheckpointError, match="learned dt / B / C norms"):
        save_pretrained(model, tmp_path / "bad", format="hf")


def test_jamba_unsupported_values_are_refused_together(saved, tmp_path):
    _, folder = saved["moe"]
    raw = json.loads((folder / "config.json").read_text())
    raw.update(hidden_act="gelu", attn_layer_offset=2, num_experts_per_tok=9, mamba_dt_rank=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as info:
        from_pretrained(bad)
    text = str(info.value)
    for part in ("hidden_act 'gelu'", "attn_layer_offset 2 must be smaller than attn_layer_period 2",
                 "num_experts_per_tok must be an integer in [1, num_experts=4]", "mamba_dt_rank"):
        assert part in text


def test_jamba_left_padded_batch_equals_rows_alone_and_the_cli_reads_it(saved, capsys):
    from mambakit.cli import main

    ref, folder = saved["moe"]
    model = from_pretrained(folder)
    short, long = ids_for(ref.config.vocab_size, 1, 5, seed=3), ids_for(ref.config.vocab_size, 1, 9, seed=4)
    pad = torch.zeros(1, 4, dtype=torch.long)
    batch = torch.cat([torch.cat([pad, short], 1), long])
    mask = torch.cat([torch.cat([pad, torch.ones_like(short)], 1), torch.ones_like(long)])
    out = model.generate(batch, 6, temperature=0, attention_mask=mask)
    assert out[0, 4:].tolist() == model.generate(short, 6, temperature=0)[0].tolist()
    assert out[1].tolist() == model.generate(long, 6, temperature=0)[0].tolist()
    assert out.tolist() == hf_generate(ref, batch, mask, new_tokens=6).tolist()
    assert main(["info", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "mixer+mlp per layer: attention+routed, mamba+gated; attention at layers [1, 3]" in text
    assert "bcdt_rms_weight" in text
