"""Granite-4.0-H (transformers model_type "granitemoehybrid": Mamba-2 + attention, µP multipliers, a shared SwiGLU
expert plus top-k routed experts) against transformers: loading, logits, greedy generation, chunked prefill, saving
back, both tensor namings, refusals (CPU, fp32, tiny random models built by transformers itself)."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "GraniteMoeHybridForCausalLM"):
    pytest.skip("this transformers has no GraniteMoeHybrid", allow_module_level=True)

from mambakit.errors import CheckpointError, MambaKitError  # noqa: E402
from mambakit.layers.moe import SharedExpertMoE  # noqa: E402
from mambakit.models.io import from_pretrained  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.models.io.hybrid_helpers import hf_generate, round_trip, save_cases  # noqa: E402
from tests.models.test_pretrained import ids_for, perturb_  # noqa: E402
from tests.models.test_pretrained import our_logits as logits  # noqa: E402

transformers.logging.set_verbosity_error()

TOL = 1e-5
_BASE = dict(hidden_size=32, num_attention_heads=4, mamba_n_heads=8, mamba_d_state=8, mamba_chunk_size=16,
             shared_intermediate_size=40, intermediate_size=24)
CASES = {
    # MoE (4 experts, top 2), RoPE, every multiplier away from 1, GQA, two SSM groups
    "moe-rope": dict(_BASE, vocab_size=101, num_hidden_layers=3, num_key_value_heads=2, mamba_n_groups=2,
                     layer_types=["linear_attention", "full_attention", "linear_attention"], num_local_experts=4,
                     num_experts_per_tok=2, position_embedding_type="rope", embedding_multiplier=2.0,
                     residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=3.0),
    # dense (shared MLP only), no positional encoding, tied, biased attention, the defaults' multipliers
    "dense-nope": dict(_BASE, vocab_size=77, num_hidden_layers=2, layer_types=["full_attention", "linear_attention"],
                       num_local_experts=0, tie_word_embeddings=True, attention_bias=True, mamba_proj_bias=True,
                       rms_norm_eps=1e-5),
}


def hf_granite(case: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.GraniteMoeHybridForCausalLM(transformers.GraniteMoeHybridConfig(**CASES[case]))
    return perturb_(model, seed + 1).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_cases(hf_granite, CASES, tmp_path_factory)


@pytest.mark.parametrize("case", list(CASES))
def test_granite_loads_with_same_logits_greedy_tokens_and_chunked_prefill(case, saved):
    ref, folder = saved[case]
    model = from_pretrained(folder)
    assert isinstance(model.backbone.layers[0].mlp, SharedExpertMoE) == (case == "moe-rope")
    ids = ids_for(ref.config.vocab_size, seqlen=37)
    full = logits(model, ids)
    assert rel_err(full, logits(ref, ids)) <= TOL
    prompt = ids[:1, :9]
    want = hf_generate(ref, prompt)
    assert model.generate(prompt, want.shape[1] - prompt.shape[1], temperature=0).tolist() == want.tolist()
    cache = model.allocate_cache(2)
    with torch.no_grad():
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 7), (7, 8), (8, 37))]
    assert rel_err(torch.cat(parts, dim=1), full) <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_granite_saves_for_transformers(case, saved, tmp_path):
    ref, folder = saved[case]
    raw = round_trip(ref, folder, tmp_path / "out")
    assert raw["logits_scaling"] == ref.config.logits_scaling


def test_granite_in_memory_tensor_names_load_too(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    ref, folder = saved["moe-rope"]
    renames = {".block_sparse_moe.input_linear.weight": ".block_sparse_moe.experts.gate_up_proj",
               ".block_sparse_moe.output_linear.weight": ".block_sparse_moe.experts.down_proj",
               ".block_sparse_moe.router.layer.weight": ".block_sparse_moe.router.weight"}
    state = {}
    for k, v in load_file(str(folder / "model.safetensors")).items():
        for old, new in renames.items():
            k = k.replace(old, new)
        state[k] = v
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ids = ids_for(ref.config.vocab_size, seqlen=9)
    assert rel_err(logits(from_pretrained(tmp_path), ids), logits(ref, ids)) <= TOL


def test_granite_unsupported_values_are_refused_together(saved, tmp_path):
    _, folder = saved["moe-rope"]
    raw = json.loads((folder / "config.json").read_text())
    raw.update(position_embedding_type="alibi", layer_types=["linear_attention", "sliding_attention"],
               num_experts_per_tok=9, logits_scaling=0)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as info:
        from_pretrained(tmp_path)
    text = str(info.value)
    for part in ("position_embedding_type 'alibi'", "layer_types must list 3 entries", "num_experts_per_tok",
                 "logits_scaling must be a positive number"):
        assert part in text


def test_granite_moe_refuses_cuda_graph_decoding(saved):
    from mambakit.models.cuda_graph import check_graphable

    _, folder = saved["moe-rope"]
    with pytest.raises(MambaKitError, match="routed experts"):
        check_graphable(from_pretrained(folder), 1)


@pytest.mark.parametrize("case", list(CASES))
def test_granite_left_padded_batch_equals_rows_alone(case, saved):
    from tests.models.io.hybrid_helpers import check_left_padding

    ref, folder = saved[case]
    check_left_padding(from_pretrained(folder), ref)
