"""Bamba (transformers model_type "bamba": Mamba-2 + grouped-query attention + SwiGLU MLPs) against transformers:
loading, logits, greedy generation, the per-layer cache, chunked prefill, left padding, saving back, refusals and
the command line (CPU, fp32, tiny random models built by transformers itself)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "BambaForCausalLM"):
    pytest.skip("this transformers has no Bamba", allow_module_level=True)

from mambakit.cli import main  # noqa: E402
from mambakit.data import ByteTokenizer  # noqa: E402
from mambakit.errors import CheckpointError, MambaKitError  # noqa: E402
from mambakit.layers.attention import KVState  # noqa: E402
from mambakit.layers.state import SSMState  # noqa: E402
from mambakit.models.hybrid import HybridLM  # noqa: E402
from mambakit.models.io import from_pretrained, save_pretrained  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.models.io.hybrid_helpers import hf_generate, round_trip, save_cases  # noqa: E402
from tests.models.test_pretrained import ids_for, is_hf_full_forward_greedy, perturb_  # noqa: E402
from tests.models.test_pretrained import our_logits as logits  # noqa: E402

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")

TOL = 1e-5
_BASE = dict(hidden_size=32, intermediate_size=40, num_attention_heads=4, mamba_n_heads=8, mamba_d_state=8,
             mamba_chunk_size=16)
CASES = {
    # two attention layers, GQA 4:2, two SSM groups, the default partial rotary factor 0.5, untied
    "gqa": dict(_BASE, vocab_size=101, num_hidden_layers=4, num_key_value_heads=2, attn_layer_indices=[1, 3],
                mamba_n_groups=2),
    # tied, every bias on, a narrower conv, full rotary, another RoPE base, a finite dt limit, 1 KV head
    "tied-bias-rope": dict(_BASE, vocab_size=77, num_hidden_layers=3, num_key_value_heads=1, attn_layer_indices=[0],
                           tie_word_embeddings=True, attention_bias=True, mlp_bias=True, mamba_proj_bias=True,
                           mamba_conv_bias=False, mamba_d_conv=3, rms_norm_eps=1e-4, time_step_limit=[0.01, 2.0],
                           rope_parameters=dict(rope_type="default", rope_theta=500.0, partial_rotary_factor=1.0)),
}


def hf_bamba(case: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.BambaForCausalLM(transformers.BambaConfig(**{**CASES[case], **overrides}))
    return perturb_(model, seed + 1).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_cases(hf_bamba, CASES, tmp_path_factory)


@pytest.mark.parametrize("case", list(CASES))
def test_bamba_loads_with_same_logits_and_greedy_tokens(case, saved):
    ref, folder = saved[case]
    model = from_pretrained(folder)
    assert isinstance(model, HybridLM) and model.config.attn_layer_idx == ref.config.attn_layer_indices
    ids = ids_for(ref.config.vocab_size, seqlen=37)  # more than two SSD chunks
    assert rel_err(logits(model, ids), logits(ref, ids)) <= TOL
    prompt = ids[:1, :9]
    got = model.generate(prompt, 8, temperature=0)
    if case == "gqa":
        want = hf_generate(ref, prompt)
        assert model.generate(prompt, want.shape[1] - prompt.shape[1], temperature=0).tolist() == want.tolist()
    # transformers' decode step skips the finite dt limit: compare with its full forward (see docs/pretrained.md)
    assert is_hf_full_forward_greedy(ref, got, prompt.shape[1], ref.config.vocab_size)


def test_bamba_cache_holds_each_layers_state_and_chunked_prefill_equals_forward(saved):
    ref, folder = saved["gqa"]
    model = from_pretrained(folder)
    ids = ids_for(ref.config.vocab_size, seqlen=29, seed=2)
    full = logits(model, ids)
    cache = model.allocate_cache(2)
    with torch.no_grad():
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 5), (5, 6), (6, 21), (21, 29))]
    assert rel_err(torch.cat(parts, dim=1), full) <= TOL
    kinds = [type(s) for s in cache.states]
    assert kinds == [SSMState, KVState, SSMState, KVState] and cache.seqlen_offset == 29
    assert cache.states[1].k.shape == (2, 2, 29, 8)  # (batch, kv heads, tokens, head_dim)
    with torch.no_grad():  # one-token steps continue the same computation
        step = model.step(ids[:, 0], cache)
        again = logits(model, torch.cat([ids, ids[:, :1]], dim=1))[:, -1]
    assert rel_err(step, again) <= TOL


def test_bamba_left_padded_batch_equals_rows_alone(saved):
    ref, folder = saved["gqa"]
    model = from_pretrained(folder)
    short, long = ids_for(ref.config.vocab_size, 1, 6, seed=3), ids_for(ref.config.vocab_size, 1, 11, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(short)], 1),
                      torch.ones_like(long)])
    out = model.generate(batch, 7, temperature=0, attention_mask=mask)
    assert out[0, 5:].tolist() == model.generate(short, 7, temperature=0)[0].tolist()
    assert out[1].tolist() == model.generate(long, 7, temperature=0)[0].tolist()
    assert out.tolist() == hf_generate(ref, batch, mask, new_tokens=7).tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_bamba_saves_for_transformers(case, saved, tmp_path):
    ref, folder = saved[case]
    raw = round_trip(ref, folder, tmp_path / "out", seqlen=23)
    assert raw["eos_token_id"] == ref.config.eos_token_id
    with pytest.raises(MambaKitError, match="format 'hf' only"):
        save_pretrained(from_pretrained(folder), tmp_path / "ssm", format="mamba_ssm")


def test_bamba_unsupported_values_are_refused_together(saved, tmp_path):
    _, folder = saved["gqa"]
    raw = json.loads((folder / "config.json").read_text())
    raw.update(hidden_act="gelu", rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4),
               attn_layer_indices=[1, 9], mamba_d_head=5)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as info:
        from_pretrained(bad)
    text = str(info.value)
    for part in ("hidden_act 'gelu'", "rope_type 'linear'", "attn_layer_indices", "mamba_d_head = 8 * 5"):
        assert part in text


def test_bamba_missing_and_unexpected_tensors_are_named(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    ref, folder = saved["gqa"]
    state = load_file(str(folder / "model.safetensors"))
    state.pop("model.layers.1.self_attn.k_proj.weight")
    state["model.layers.0.mamba.extra"] = torch.zeros(3)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)missing tensors.*self_attn\.k_proj\.weight.*unexpected.*"
                                              r"mamba\.extra"):
        from_pretrained(bad)


def test_generate_and_info_cli_read_a_bamba_folder(tmp_path, capsys):
    ref = hf_bamba("gqa", vocab_size=256)
    ref.save_pretrained(tmp_path / "hf")
    assert main(["generate", "--checkpoint", str(tmp_path / "hf"), "--prompt", "hi", "--max-new-tokens", "5",
                 "--temperature", "0", "--device", "cpu"]) == 0
    tok = ByteTokenizer()
    prompt = torch.tensor([tok.encode("hi")])
    want = tok.decode(from_pretrained(tmp_path / "hf").generate(prompt, 5, temperature=0)[0].tolist())
    assert capsys.readouterr().out == want + "\n"
    assert main(["info", str(tmp_path / "hf")]) == 0
    assert "mixer: hybrid (mixer+mlp per layer: attention+gated, mamba2+gated; attention at layers [1, 3])" in \
        capsys.readouterr().out
