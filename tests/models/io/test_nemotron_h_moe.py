"""Nemotron-H with MoE layers (layers_block_type "moe" / pattern letter "E") against transformers: sigmoid routing
with score-correction bias, group-limited choice, norm_topk_prob, routed_scaling_factor, the shared expert and the
latent projections; logits, greedy tokens, saving back and refusals (CPU, fp32, tiny random models)."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "NemotronHForCausalLM"):
    pytest.skip("this transformers has no Nemotron-H", allow_module_level=True)

from mambakit.errors import CheckpointError, MambaKitError  # noqa: E402
from mambakit.layers.moe import SharedExpertMoE, TopKMoE  # noqa: E402
from mambakit.models.io import from_pretrained  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.models.io.hybrid_helpers import nemotron_dt_as_defined, round_trip, save_cases  # noqa: E402
from tests.models.test_pretrained import hf_logits, ids_for, is_hf_full_forward_greedy, perturb_  # noqa: E402
from tests.models.test_pretrained import our_logits as logits  # noqa: E402

transformers.logging.set_verbosity_error()

TOL = 1e-5
_BASE = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=40,
             ssm_state_size=8, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, chunk_size=16, vocab_size=91,
             moe_intermediate_size=24, moe_shared_expert_intermediate_size=20)
CASES = {
    # 8 experts in 4 groups, 2 groups kept, 3 chosen, renormalised and scaled
    "grouped": dict(_BASE, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=True,
                    routed_scaling_factor=2.5,
                    layers_block_type=["linear_attention", "moe", "full_attention", "moe", "linear_attention", "mlp"]),
    # one group (transformers needs an attention layer for its cache), weights not renormalised, experts in a
    # narrower latent width with biases, silu
    "latent": dict(_BASE, n_routed_experts=6, num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=False,
                   moe_latent_size=16, mlp_bias=True, mlp_hidden_act="silu",
                   layers_block_type=["moe", "linear_attention", "full_attention", "moe"]),
}


def hf_nemotron_moe(case: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = perturb_(transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**CASES[case])), seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a bias large enough to change which experts are chosen
                buf.copy_(0.3 * torch.randn(buf.shape, generator=g))
    return nemotron_dt_as_defined(model.eval())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_cases(hf_nemotron_moe, CASES, tmp_path_factory)


@pytest.mark.parametrize("case", list(CASES))
def test_nemotron_h_moe_same_logits_and_greedy_tokens(case, saved):
    ref, folder = saved[case]
    model = from_pretrained(folder)
    moes = [layer.mlp for layer in model.backbone.layers if isinstance(layer.mlp, SharedExpertMoE)]
    assert len(moes) == ref.config.layers_block_type.count("moe")
    ids = ids_for(ref.config.vocab_size, seqlen=29)
    assert rel_err(logits(model, ids), hf_logits(ref, ids)) <= TOL
    prompt = ids[:1, :7]
    got = model.generate(prompt, 10, temperature=0)
    assert is_hf_full_forward_greedy(ref, got, prompt.shape[1], ref.config.vocab_size)


@pytest.mark.parametrize("case", list(CASES))
def test_nemotron_h_moe_saves_for_transformers(case, saved, tmp_path):
    ref, folder = saved[case]
    raw = round_trip(ref, folder, tmp_path / "out", prepare=nemotron_dt_as_defined)
    assert raw["layers_block_type"] == ref.config.layers_block_type
    for key in ("n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "moe_latent_size"):
        assert raw[key] == getattr(ref.config, key)


def test_nemotron_h_moe_pattern_letter_e(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    ref, folder = saved["latent"]
    raw = json.loads((folder / "config.json").read_text())
    del raw["layers_block_type"]
    raw["hybrid_override_pattern"] = "EM*E"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    save_file(load_file(str(folder / "model.safetensors")), str(tmp_path / "model.safetensors"))
    ids = ids_for(ref.config.vocab_size, seqlen=9)
    assert rel_err(logits(from_pretrained(tmp_path), ids), hf_logits(ref, ids)) <= TOL


def test_nemotron_h_moe_bad_routing_values_are_refused_together(saved, tmp_path):
    _, folder = saved["grouped"]
    raw = json.loads((folder / "config.json").read_text())
    raw.update(n_group=3, moe_latent_size=0, num_experts_per_tok=0)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as info:
        from_pretrained(tmp_path)
    for part in ("moe_latent_size must be null", "num_experts_per_tok must be a positive integer"):
        assert part in str(info.value)
    raw.update(n_group=3, moe_latent_size=None, num_experts_per_tok=2)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="n_group=3 must divide num_experts=8"):
        from_pretrained(tmp_path)


@torch.no_grad()
def _ref_sigmoid_group(moe: TopKMoE, x: torch.Tensor) -> torch.Tensor:
    """Per token, in float64: every expert's score and the group rule written out one token at a time."""
    w = moe.router.weight.double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    per = moe.num_experts // moe.n_group
    for t in range(x.shape[0]):
        s = torch.sigmoid(w @ x[t].double())
        c = s + moe.e_score_correction_bias.double()
        groups = sorted(range(moe.n_group), key=lambda g: -float(c[g * per:(g + 1) * per].topk(2).values.sum()))
        allowed = [e for g in groups[:moe.topk_group] for e in range(g * per, (g + 1) * per)]
        chosen = sorted(allowed, key=lambda e: -float(c[e]))[:moe.top_k]
        weights = s[chosen] / (s[chosen].sum() + 1e-20) if moe.norm_topk_prob else s[chosen]
        for e, wt in zip(chosen, weights * moe.routed_scaling_factor):
            out[t] += wt * moe.expert(e, x[t:t + 1].double())[0]
    return out


def test_sigmoid_group_routing_matches_a_per_token_reference():
    torch.manual_seed(3)
    moe = TopKMoE(12, 10, num_experts=9, top_k=4, activation="relu2", routing="sigmoid_group", gated=False,
                  n_group=3, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.7).double()
    with torch.no_grad():
        moe.e_score_correction_bias.normal_(0, 0.5)
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    assert rel_err(y.reshape(-1, 12), _ref_sigmoid_group(moe, x.detach().reshape(-1, 12))) <= 1e-12
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(moe.router.weight.grad).all()
    assert moe.router.weight.grad.abs().sum() > 0  # the weights are scores: the router trains through them


@pytest.mark.parametrize("kwargs, text", [
    (dict(n_group=4), "must divide num_experts"),
    (dict(n_group=4, topk_group=5, num_experts=8), "must be <= n_group"),
    (dict(n_group=8, num_experts=8, top_k=1), "two best experts"),
    (dict(n_group=4, topk_group=1, num_experts=8, top_k=3), "experts of the kept groups"),
    (dict(routing="topk_softmax", n_group=2), "belong to the 'sigmoid_group' routing"),
    (dict(latent_size=0), "latent_size"),
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor"),
])
def test_moe_refuses_bad_routing_arguments(kwargs, text):
    args = dict(num_experts=6, top_k=2, routing="sigmoid_group")
    args.update(kwargs)
    with pytest.raises(MambaKitError, match=text):
        TopKMoE(8, 4, **args)
