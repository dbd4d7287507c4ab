"""Falcon-H1 (transformers model_type "falcon_h1": attention and a Mamba-2 mixer of width mamba_d_ssm side by side in
every layer, SwiGLU MLPs, µP multipliers) against transformers: loading, logits, greedy generation, the per-layer
cache, chunked prefill, left padding, saving back and refusals (CPU, fp32, tiny random models built by transformers
itself)."""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FalconH1ForCausalLM"):
    pytest.skip("this transformers has no Falcon-H1", allow_module_level=True)

from mambakit.errors import CheckpointError  # noqa: E402
from mambakit.layers.parallel_mixer import ParallelMixer, ParallelState  # noqa: E402
from mambakit.models.hybrid import HybridLM  # noqa: E402
from mambakit.models.io import from_pretrained, save_pretrained  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.models.io.hybrid_helpers import (check_gradients, check_left_padding, hf_generate, refusal,  # noqa: E402
                                         round_trip, save_cases)  # noqa: E402
from tests.models.test_pretrained import ids_for, is_hf_full_forward_greedy, perturb_  # noqa: E402
from tests.models.test_pretrained import our_logits as logits  # noqa: E402

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")

TOL = 1e-5
_MULTIPLIERS = dict(embedding_multiplier=1.7, lm_head_multiplier=0.3, mlp_multipliers=[0.8, 1.3], key_multiplier=0.7,
                    attention_in_multiplier=1.2, attention_out_multiplier=0.9, ssm_in_multiplier=1.1,
                    ssm_out_multiplier=0.6, ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.7])
_BASE = dict(hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=4,
             mamba_d_state=4, mamba_chunk_size=8, **_MULTIPLIERS)
CASES = {
    # d_ssm 24 (narrower than expand * hidden = 32), no gated norm (y * silu(z)), GQA 4:2, untied
    "narrow-ungated": dict(_BASE, vocab_size=53, num_hidden_layers=3, mamba_d_ssm=24),
    # the gated norm after the gate over two groups, head_dim 6 (not hidden / heads), every bias, tied, another RoPE
    # base, a finite dt limit, d_ssm from mamba_expand
    "gated-bias": dict(_BASE, vocab_size=41, num_hidden_layers=2, mamba_d_ssm=None, mamba_expand=2,
                       mamba_rms_norm=True, mamba_norm_before_gate=False, mamba_n_groups=2, head_dim=6,
                       attention_bias=True, mlp_bias=True, mamba_proj_bias=True, projectors_bias=True,
                       tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=500.0),
                       time_step_limit=[0.01, 3.0], rms_norm_eps=1e-4),
    # the gated norm before the gate (Falcon-H1's default when on), in_proj bias without out_proj bias
    "norm-first": dict(_BASE, vocab_size=37, num_hidden_layers=2, mamba_d_ssm=16, mamba_rms_norm=True,
                       mamba_norm_before_gate=True, mamba_proj_bias=True, projectors_bias=False),
}


def hf_falcon_h1(case: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.FalconH1ForCausalLM(transformers.FalconH1Config(**{**CASES[case], **overrides}))
    return perturb_(model, seed + 1).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_cases(hf_falcon_h1, CASES, tmp_path_factory)


@pytest.mark.parametrize("case", list(CASES))
def test_falcon_h1_loads_with_same_logits_and_greedy_tokens(case, saved):
    ref, folder = saved[case]
    model = from_pretrained(folder)
    assert isinstance(model, HybridLM) and all(isinstance(layer.mixer, ParallelMixer)
                                               for layer in model.backbone.layers)
    d_ssm = ref.config.mamba_d_ssm or ref.config.mamba_expand * ref.config.hidden_size
    assert model.backbone.layers[0].mixer.mamba.d_inner == d_ssm
    ids = ids_for(ref.config.vocab_size, seqlen=19)  # more than two SSD chunks
    assert rel_err(logits(model, ids), logits(ref, ids)) <= TOL
    prompt = ids[:1, :6]
    got = model.generate(prompt, 7, temperature=0)
    if case == "narrow-ungated":
        assert got.tolist() == hf_generate(ref, prompt, new_tokens=7).tolist()
    # transformers' decode step skips the finite dt limit: compare with its full forward (see docs/pretrained.md)
    assert is_hf_full_forward_greedy(ref, got, prompt.shape[1], ref.config.vocab_size)


def test_falcon_h1_cache_holds_both_states_and_chunked_prefill_equals_forward(saved):
    ref, folder = saved["gated-bias"]
    model = from_pretrained(folder)
    ids = ids_for(ref.config.vocab_size, seqlen=17, seed=2)
    full = logits(model, ids)
    cache = model.allocate_cache(2)
    with torch.no_grad():
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 5), (5, 6), (6, 13), (13, 17))]
    assert rel_err(torch.cat(parts, dim=1), full) <= TOL
    assert all(type(s) is ParallelState for s in cache.states) and cache.seqlen_offset == 17
    assert cache.states[0].kv.k.shape == (2, 2, 17, 6) and cache.states[0].ssm.ssm.shape == (2, 4, 8, 4)
    with torch.no_grad():  # one-token steps (narrow mixer, scaled in_proj, scaled keys) continue the same computation
        step = model.step(ids[:, 0], cache)
        again = logits(model, torch.cat([ids, ids[:, :1]], dim=1))[:, -1]
    assert rel_err(step, again) <= TOL


def test_falcon_h1_left_padded_batch_equals_rows_alone(saved):
    ref, folder = saved["narrow-ungated"]
    model = from_pretrained(folder)
    check_left_padding(model, ref)


@pytest.mark.parametrize("case", list(CASES))
def test_falcon_h1_saves_for_transformers(case, saved, tmp_path):
    ref, folder = saved[case]
    raw = round_trip(ref, folder, tmp_path / "out", seqlen=11)
    for key in ("mamba_rms_norm", "mamba_norm_before_gate", "projectors_bias", "mamba_proj_bias", "key_multiplier",
                "ssm_multipliers", "mlp_multipliers", "embedding_multiplier"):
        assert raw[key] == getattr(ref.config, key), key
    assert raw["lm_head_multiplier"] == pytest.approx(ref.config.lm_head_multiplier, rel=1e-12)


def test_falcon_h1_writer_refuses_what_falcon_h1_cannot_hold(saved, tmp_path):
    _, folder = saved["narrow-ungated"]
    model = from_pretrained(folder)
    model.config.residual_multiplier = 0.5
    model.backbone.layers[1].mixer.multipliers["ssm_out"] = 2.0  # layers must agree
    with pytest.raises(CheckpointError) as info:
        save_pretrained(model, tmp_path / "bad", format="hf")
    assert "residual_multiplier" in str(info.value) and "same mixer configuration" in str(info.value)
    assert not (tmp_path / "bad").exists()


def test_falcon_h1_unsupported_values_are_refused_together(saved, tmp_path):
    _, folder = saved["narrow-ungated"]
    text = refusal(folder, tmp_path / "bad", hidden_act="gelu", mamba_d_head=5, ssm_multipliers=[1.0, 2.0],
                   lm_head_multiplier=0.0, rope_parameters=dict(rope_type="yarn", factor=2.0, rope_theta=1e4))
    for part in ("hidden_act 'gelu'", "mamba_n_heads * mamba_d_head = 4 * 5", "ssm_multipliers must be a list of 5",
                 "lm_head_multiplier must be a positive number", "rope_type 'yarn'"):
        assert part in text


def test_falcon_h1_layers_count_as_attention_layers(saved):
    from mambakit.errors import MambaKitError

    _, folder = saved["norm-first"]
    model = from_pretrained(folder)
    assert model.config.attn_layer_idx == [0, 1]  # every layer's KV cache grows: no CUDA graph
    with pytest.raises(MambaKitError, match="attention layers"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, temperature=0, cuda_graph=True)


def test_falcon_h1_gradients_equal_transformers(saved):
    ref, folder = saved["gated-bias"]
    model = from_pretrained(folder)
    assert check_gradients(model, ref, "falcon_h1", ids_for(ref.config.vocab_size, seqlen=11, seed=5)) == \
        len(list(ref.parameters()))
