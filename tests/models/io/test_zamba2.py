"""Zamba2 (transformers model_type "zamba2": Mamba-2 layers, shared attention + MLP blocks reused at the "hybrid"
layers with per-use adapters and linears, the token embeddings concatenated into their input) against
transformers: loading, logits, greedy generation, the per-layer cache, chunked prefill, left padding, saving back
and refusals (CPU, fp32, tiny random models built by transformers itself)."""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Zamba2ForCausalLM"):
    pytest.skip("this transformers has no Zamba2", allow_module_level=True)

from mambakit.errors import CheckpointError  # noqa: E402
from mambakit.layers.attention import KVState  # noqa: E402
from mambakit.layers.shared_block import SharedUseState  # noqa: E402
from mambakit.layers.state import SSMState  # noqa: E402
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
_BASE = dict(hidden_size=16, intermediate_size=20, num_attention_heads=2, n_mamba_heads=4, mamba_d_state=4,
             chunk_size=8, adapter_rank=3)
CASES = {
    # two shared blocks used alternately (0, 1, 0), q/k/v adapters, GELU
    "two-blocks": dict(_BASE, vocab_size=53, num_hidden_layers=6, num_mem_blocks=2, use_shared_attention_adapter=True,
                       layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"]),
    # one block with RoPE, biases, GQA 4:2 (no attention adapters), SiLU, two SSM groups, a narrower conv, another
    # epsilon and time_step_min
    "rope-bias-gqa": dict(_BASE, vocab_size=41, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          layers_block_type=["hybrid", "linear_attention", "hybrid"], use_mem_rope=True,
                          rope_parameters=dict(rope_type="default", rope_theta=300.0), add_bias_linear=True,
                          hidden_act="silu", mamba_ngroups=2, mamba_d_conv=3, rms_norm_eps=1e-4,
                          time_step_min=0.01),
}


def hf_zamba2(case: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.Zamba2ForCausalLM(transformers.Zamba2Config(**{**CASES[case], **overrides}))
    return perturb_(model, seed + 1).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_cases(hf_zamba2, CASES, tmp_path_factory)


@pytest.mark.parametrize("case", list(CASES))
def test_zamba2_loads_with_same_logits_and_greedy_tokens(case, saved):
    ref, folder = saved[case]
    model = from_pretrained(folder)
    assert isinstance(model, HybridLM)
    assert [i for i, s in enumerate(model.config.layers) if s.get("shared") is not None] == ref.config.hybrid_layer_ids
    ids = ids_for(ref.config.vocab_size, seqlen=21)  # more than two SSD chunks
    assert rel_err(logits(model, ids), logits(ref, ids)) <= TOL
    prompt = ids[:1, :7]
    got = model.generate(prompt, 8, temperature=0)
    assert got.tolist() == hf_generate(ref, prompt).tolist()
    assert is_hf_full_forward_greedy(ref, got, prompt.shape[1], ref.config.vocab_size)


def test_zamba2_cache_holds_each_layers_state_and_chunked_prefill_equals_forward(saved):
    ref, folder = saved["two-blocks"]
    model = from_pretrained(folder)
    ids = ids_for(ref.config.vocab_size, seqlen=19, seed=2)
    full = logits(model, ids)
    cache = model.allocate_cache(2)
    with torch.no_grad():
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 5), (5, 6), (6, 15), (15, 19))]
    assert rel_err(torch.cat(parts, dim=1), full) <= TOL
    kinds = [type(s) for s in cache.states]
    assert kinds == [SSMState, SharedUseState, SSMState, SharedUseState, SharedUseState, SSMState]
    assert isinstance(cache.states[1].kv, KVState) and cache.states[1].kv.k.shape == (2, 2, 19, 16)
    assert cache.states[1].kv.k.data_ptr() != cache.states[4].kv.k.data_ptr()  # one KV cache per use
    with torch.no_grad():
        step = model.step(ids[:, 0], cache)
        again = logits(model, torch.cat([ids, ids[:, :1]], dim=1))[:, -1]
    assert rel_err(step, again) <= TOL


def test_zamba2_left_padded_batch_equals_rows_alone(saved):
    ref, folder = saved["rope-bias-gqa"]  # RoPE: positions count real tokens only
    model = from_pretrained(folder)
    check_left_padding(model, ref)


@pytest.mark.parametrize("case", list(CASES))
def test_zamba2_saves_for_transformers(case, saved, tmp_path):
    ref, folder = saved[case]
    raw = round_trip(ref, folder, tmp_path / "out", seqlen=13)
    for key in ("num_mem_blocks", "hybrid_layer_ids", "use_shared_attention_adapter", "use_mem_rope", "adapter_rank",
                "add_bias_linear", "hidden_act", "num_key_value_heads", "time_step_min", "tie_word_embeddings"):
        assert raw.get(key, getattr(ref.config, key)) == getattr(ref.config, key), key


def test_zamba2_writer_refuses_what_zamba2_cannot_hold(saved, tmp_path):
    _, folder = saved["two-blocks"]
    model = from_pretrained(folder)
    model.config.layers[3]["shared"] = 0  # uses 0, 0, 0 with two blocks: not the j % num_mem_blocks order
    model.backbone.layers[0].mixer.dt_limit = (0.001, 5.0)
    with pytest.raises(CheckpointError) as info:
        save_pretrained(model, tmp_path / "bad", format="hf")
    assert "block j % num_blocks" in str(info.value) and "dt_limit" in str(info.value)
    assert not (tmp_path / "bad").exists()


def test_zamba2_unsupported_values_are_refused_together(saved, tmp_path):
    _, folder = saved["two-blocks"]
    text = refusal(folder, tmp_path / "bad", hidden_act="gelu_new", num_key_value_heads=1, n_mamba_heads=5,
                   tie_word_embeddings=False)
    for part in ("hidden_act 'gelu_new'", "use_shared_attention_adapter needs num_key_value_heads",
                 "n_mamba_heads 5 must divide", "tie_word_embeddings false with hybrid layers"):
        assert part in text
    assert "layers_block_type must list 6 entries" in refusal(folder, tmp_path / "bad",
                                                              layers_block_type=["mamba"] * 5 + ["x"])


def test_zamba2_missing_shared_tensors_are_named(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = saved["two-blocks"]
    state = load_file(str(folder / "model.safetensors"))
    state.pop("model.layers.1.shared_transformer.self_attn.linear_q_adapter_list.2.0.weight")  # layer 4's adapter
    state.pop("model.layers.3.linear.weight")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)missing tensors.*layers\.1\.shared_transformer\.self_attn\."
                                              r"linear_q_adapter_list\.2\.0\.weight.*layers\.3\.linear\.weight"):
        from_pretrained(bad)


def test_generate_and_info_cli_read_a_zamba2_folder(tmp_path, capsys):
    from mambakit.cli import main
    from mambakit.data import ByteTokenizer
    from mambakit.errors import MambaKitError

    hf_zamba2("rope-bias-gqa", vocab_size=256).save_pretrained(tmp_path / "hf")
    assert main(["generate", "--checkpoint", str(tmp_path / "hf"), "--prompt", "hi", "--max-new-tokens", "4",
                 "--temperature", "0", "--device", "cpu"]) == 0
    tok = ByteTokenizer()
    model = from_pretrained(tmp_path / "hf")
    prompt = torch.tensor([tok.encode("hi")])
    assert capsys.readouterr().out == tok.decode(model.generate(prompt, 4, temperature=0)[0].tolist()) + "\n"
    assert main(["info", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "attention at layers [0, 2]" in out  # the layers using the shared block
    assert "shared blocks (" in out and "used at layers [0, 2]" in out
    with pytest.raises(MambaKitError, match="attention layers"):  # their KV caches grow: no CUDA graph
        model.generate(prompt, 2, temperature=0, cuda_graph=True)


def test_zamba2_gradients_equal_transformers(saved):
    ref, folder = saved["two-blocks"]
    model = from_pretrained(folder)
    assert check_gradients(model, ref, "zamba2", ids_for(ref.config.vocab_size, seqlen=11, seed=5)) == \
        len(list(ref.parameters()))


def test_hybrid_config_checks_the_shared_block_fields():
    from mambakit.errors import MambaKitError
    from mambakit.models.hybrid import HybridConfig

    with pytest.raises(MambaKitError, match="must give num_heads and d_intermediate"):
        HybridConfig(layers=[{"mixer": "mamba2", "mlp": None, "shared": 0}], shared={"num_blocks": 1})
    with pytest.raises(MambaKitError, match="'shared' must index one of"):
        HybridConfig(layers=[{"mixer": "attention", "mlp": None, "shared": 0}], shared={"num_blocks": 1})
    with pytest.raises(MambaKitError, match="'shared' must index one of"):
        HybridConfig(layers=[{"mixer": "mamba2", "mlp": None, "shared": 1}], shared={"num_blocks": 1})
