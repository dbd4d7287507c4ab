"""Nemotron-H (transformers model_type "nemotron_h": each layer one of Mamba-2, attention without positional encoding,
or a relu2 MLP) against transformers: loading, logits, greedy generation, the per-layer cache, left padding, saving
back and refusals (CPU, fp32, tiny random models built by transformers itself)."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "NemotronHForCausalLM"):
    pytest.skip("this transformers has no Nemotron-H", allow_module_level=True)

from mambakit.errors import CheckpointError  # noqa: E402
from mambakit.layers.attention import KVState  # noqa: E402
from mambakit.layers.state import SSMState  # noqa: E402
from mambakit.models.hybrid import HybridLM  # noqa: E402
from mambakit.models.io import from_pretrained  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.models.io.hybrid_helpers import nemotron_dt_as_defined, round_trip, save_cases  # noqa: E402
from tests.models.test_pretrained import hf_logits, ids_for, is_hf_full_forward_greedy, perturb_  # noqa: E402
from tests.models.test_pretrained import our_logits as logits  # noqa: E402

transformers.logging.set_verbosity_error()

TOL = 1e-5
_BASE = dict(hidden_size=32, num_attention_heads=4, head_dim=8, intermediate_size=40, ssm_state_size=8,
             mamba_num_heads=8, mamba_head_dim=8, chunk_size=16)
CASES = {
    "pattern": dict(_BASE, vocab_size=101, num_key_value_heads=2, n_groups=2,
                    layers_block_type=["linear_attention", "mlp", "full_attention", "mlp", "linear_attention"]),
    # tie_word_embeddings (which NemotronHForCausalLM ignores: lm_head stays its own tensor), biases, a narrower
    # conv, dt clamped to [0.03, 0.2] (about 20% of dt below, 7% above) while time_step_min (init only) is 0.05, a
    # wider Mamba (expand 4), 1 KV head, squared-ReLU -> silu
    "tied-bias": dict(_BASE, vocab_size=77, num_key_value_heads=1, n_groups=1, tie_word_embeddings=True,
                      use_bias=True, mlp_bias=True, use_conv_bias=False, conv_kernel=3, time_step_min=0.05,
                      time_step_limit=(0.03, 0.2),
                      mamba_num_heads=16, mlp_hidden_act="silu", layer_norm_epsilon=1e-4,
                      layers_block_type=["full_attention", "linear_attention", "mlp"]),
}


def hf_nemotron(case: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**CASES[case]))
    return nemotron_dt_as_defined(perturb_(model, seed + 1).eval())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_cases(hf_nemotron, CASES, tmp_path_factory)


@pytest.mark.parametrize("case", list(CASES))
def test_nemotron_h_loads_with_same_logits_and_greedy_tokens(case, saved):
    ref, folder = saved[case]
    model = from_pretrained(folder)
    assert isinstance(model, HybridLM) and model.config.n_layer == len(ref.config.layers_block_type)
    assert not model.config.tie_embeddings
    ids = ids_for(ref.config.vocab_size, seqlen=37)
    assert rel_err(logits(model, ids), hf_logits(ref, ids)) <= TOL
    prompt = ids[:1, :9]
    got = model.generate(prompt, 12, temperature=0)
    # transformers' decode step skips its dt clamp (time_step_limit): compare with its full forward
    assert is_hf_full_forward_greedy(ref, got, prompt.shape[1], ref.config.vocab_size)


def test_nemotron_h_cache_chunked_prefill_and_left_padding(saved):
    ref, folder = saved["pattern"]
    model = from_pretrained(folder)
    ids = ids_for(ref.config.vocab_size, seqlen=21, seed=2)
    cache = model.allocate_cache(2)
    with torch.no_grad():
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 4), (4, 5), (5, 21))]
    assert rel_err(torch.cat(parts, dim=1), logits(model, ids)) <= TOL
    assert [type(s) for s in cache.states] == [SSMState, type(None), KVState, type(None), SSMState]
    short, long = ids[:1, :6], ids[1:, :10]
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = (torch.arange(10)[None] >= torch.tensor([[4], [0]])).long()
    out = model.generate(batch, 6, temperature=0, attention_mask=mask)
    assert out[0, 4:].tolist() == model.generate(short, 6, temperature=0)[0].tolist()
    assert out[1].tolist() == model.generate(long, 6, temperature=0)[0].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_nemotron_h_saves_for_transformers(case, saved, tmp_path):
    ref, folder = saved[case]
    raw = round_trip(ref, folder, tmp_path / "out", prepare=nemotron_dt_as_defined)
    assert raw["layers_block_type"] == ref.config.layers_block_type
    assert raw["time_step_limit"] == list(ref.config.time_step_limit)


def test_nemotron_h_legacy_pattern_and_model_prefix_load(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    ref, folder = saved["pattern"]
    raw = json.loads((folder / "config.json").read_text())
    del raw["layers_block_type"]
    raw["hybrid_override_pattern"] = "M-*-M"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    state = load_file(str(folder / "model.safetensors"))
    save_file({k.replace("backbone.", "model.", 1): v for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    ids = ids_for(ref.config.vocab_size, seqlen=9)
    assert rel_err(logits(from_pretrained(tmp_path), ids), hf_logits(ref, ids)) <= TOL


def test_nemotron_h_legacy_dt_limit_name_loads(saved, tmp_path):
    """mamba_dt_limit, the older name of time_step_limit, read as NemotronHConfig reads it (a clamp at [0.03, 0.2]:
    were it ignored, the logits would be those of no clamp)."""
    from safetensors.torch import load_file, save_file

    ref, folder = saved["tied-bias"]
    raw = json.loads((folder / "config.json").read_text())
    raw["mamba_dt_limit"] = raw.pop("time_step_limit")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    save_file(load_file(str(folder / "model.safetensors")), str(tmp_path / "model.safetensors"))
    model = from_pretrained(tmp_path)
    assert {m.dt_limit for m in model.modules() if hasattr(m, "dt_limit")} == {(0.03, 0.2)}
    ids = ids_for(ref.config.vocab_size, seqlen=9)
    assert rel_err(logits(model, ids), hf_logits(ref, ids)) <= TOL


def test_nemotron_h_unsupported_values_are_refused_together(saved, tmp_path):
    _, folder = saved["pattern"]
    raw = json.loads((folder / "config.json").read_text())
    raw.update(layers_block_type=["linear_attention", "cross", "full_attention"], num_nextn_predict_layers=1,
               mlp_hidden_act="swish", sliding_window=64, mamba_num_heads=7, time_step_limit=[0.2, 0.1])
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as info:
        from_pretrained(tmp_path)
    text = str(info.value)
    for part in ("unknown layer types ['cross']", "multi-token-prediction", "mlp_hidden_act 'swish'",
                 "sliding_window 64", "multiple of hidden_size",
                 "time_step_limit must be [low, high] with 0 <= low < high"):
        assert part in text
