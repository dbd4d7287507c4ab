"""The MoE hybrids loaded in bfloat16, by transformers and by mambakit from the same folder: the routers' dtypes
as transformers keeps them (Nemotron-H's router and score-correction bias float32, `_keep_in_fp32_modules_strict`;
Jamba's and Granite's in the model's dtype), the same experts chosen for the same router inputs, logits within
bfloat16 rounding (as far from the float32 model's as transformers' own bfloat16 logits), routing in float32 under
autocast, and `model.to(torch.bfloat16)` giving the MoE tensors a bfloat16 load gives (CPU, tiny models)."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mambakit.layers.moe import TopKMoE  # noqa: E402
from mambakit.models.io import from_pretrained  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.models.io.hybrid_helpers import nemotron_dt_as_defined  # noqa: E402
from tests.models.test_pretrained import ids_for, perturb_  # noqa: E402

transformers.logging.set_verbosity_error()

_NEMOTRON = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=40,
                 ssm_state_size=8, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, chunk_size=16, vocab_size=91,
                 moe_intermediate_size=24, moe_shared_expert_intermediate_size=20, n_routed_experts=16,
                 num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                 # the first layer MoE: its router reads the (identical) normed embeddings on both sides
                 layers_block_type=["moe", "linear_attention", "moe", "full_attention", "moe"])
_JAMBA = dict(hidden_size=32, intermediate_size=24, num_attention_heads=4, mamba_d_state=8, vocab_size=61,
              num_hidden_layers=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, num_experts=8,
              num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1)
_GRANITE = dict(hidden_size=32, num_attention_heads=4, mamba_n_heads=8, mamba_d_state=8, mamba_chunk_size=16,
                shared_intermediate_size=40, intermediate_size=24, vocab_size=101, num_hidden_layers=3,
                num_key_value_heads=2, layer_types=["linear_attention", "full_attention", "linear_attention"],
                num_local_experts=8, num_experts_per_tok=2)
#: model_type -> (transformers class name, config class name, config, float32 router)
FAMILIES = {
    "nemotron_h": ("NemotronHForCausalLM", "NemotronHConfig", _NEMOTRON, True),
    "jamba": ("JambaForCausalLM", "JambaConfig", _JAMBA, False),
    "granitemoehybrid": ("GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig", _GRANITE, False),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    """(model_type, the folder a float32 transformers model was saved into)."""
    model_cls, config_cls, config, _ = FAMILIES[request.param]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"this transformers has no {model_cls}")
    torch.manual_seed(0)
    model = perturb_(getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)), 1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # large enough to change which experts are chosen
                buf.copy_(0.3 * torch.randn(buf.shape, generator=g))
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(folder)
    return request.param, folder


def _hf_routing(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list, list]:
    """transformers' logits and, per MoE layer, its router's input (tokens, d_model) and sorted expert ids."""
    inputs, chosen = [], []

    def record(module, args, out):
        inputs.append(args[0].reshape(-1, args[0].shape[-1]))
        chosen.append(out[2].sort(-1).values)

    routers = [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]
    assert routers, "no transformers router found"
    hooks = [m.register_forward_hook(record) for m in routers]
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits  # no cache: see test_pretrained.hf_logits
    finally:
        for h in hooks:
            h.remove()
    return logits, inputs, chosen


def _our_routing(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """mambakit's logits and, per MoE layer, its sorted expert ids."""
    chosen = []
    moes = [m for m in model.modules() if isinstance(m, TopKMoE)]
    for moe in moes:
        def route(x, moe=moe):
            weights, index = TopKMoE.route(moe, x)
            chosen.append(index.sort(-1).values)
            return weights, index
        moe.route = route
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for moe in moes:
            del moe.route
    return logits, chosen


def _routers(model: torch.nn.Module) -> list[TopKMoE]:
    return [m for m in model.modules() if isinstance(m, TopKMoE)]


def test_bf16_routers_choose_transformers_experts(saved):
    model_type, folder = saved
    fp32_router = FAMILIES[model_type][3]
    as_defined = nemotron_dt_as_defined if model_type == "nemotron_h" else (lambda m: m)
    ref = as_defined(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval())
    model = from_pretrained(folder, dtype="bfloat16")
    want = torch.float32 if fp32_router else torch.bfloat16
    theirs = {n: p.dtype for n, p in ref.named_parameters() if n.endswith(("gate.weight", "router.weight"))}
    assert theirs and set(theirs.values()) == {want}, theirs
    for moe in _routers(model):
        assert moe.router.weight.dtype == want
        if fp32_router:
            assert moe.e_score_correction_bias.dtype == torch.float32
        assert moe.expert(0, torch.zeros(1, moe.router.in_features, dtype=torch.bfloat16)).dtype == torch.bfloat16

    ids = ids_for(ref.config.vocab_size, batch=4, seqlen=64, seed=5)
    hf_logits, hf_inputs, hf_chosen = _hf_routing(ref, ids)
    logits, chosen = _our_routing(model, ids)
    assert len(chosen) == len(hf_chosen) == len(_routers(model))
    with torch.no_grad():
        exact = as_defined(transformers.AutoModelForCausalLM.from_pretrained(folder).eval())
        exact = exact(ids, use_cache=False).logits
    # tiny random models amplify bfloat16 rounding (a near tie flips a routed expert): measured against the float32
    # model, mambakit's bfloat16 logits are about as close as transformers' bfloat16 logits
    ours = logits[..., :ref.config.vocab_size]
    assert torch.isfinite(ours).all() and rel_err(ours, exact) <= 1.25 * rel_err(hf_logits, exact) + 1e-2
    if model_type == "nemotron_h":  # its first layer's router reads the same normed embeddings as transformers'
        assert torch.equal(chosen[0], hf_chosen[0])
    # every router, given the very input transformers' router got, chooses the very same experts; later layers'
    # inputs differ between the two by bfloat16 rounding, so their choices end to end may differ at near ties
    flips = 0
    with torch.no_grad():
        for moe, x, want_ids in zip(_routers(model), hf_inputs, hf_chosen):
            assert torch.equal(moe.route(x)[1].sort(-1).values, want_ids)
            if fp32_router:  # the same router rounded to bfloat16 would choose otherwise on some tokens
                rounded = copy.deepcopy(moe)
                rounded.router.weight.copy_(rounded.router.weight.bfloat16())
                rounded.e_score_correction_bias.copy_(rounded.e_score_correction_bias.bfloat16())
                flips += int((rounded.route(x)[1].sort(-1).values != want_ids).any(-1).sum())
    assert flips > 0 or not fp32_router


def test_to_bf16_keeps_the_float32_router(saved):
    model_type, folder = saved
    fp32_router = FAMILIES[model_type][3]
    full = from_pretrained(folder)
    exact = {id(m): m.router.weight.detach().clone() for m in _routers(full)}
    model = full.to(torch.bfloat16)
    for moe in _routers(model):
        if fp32_router:
            assert moe.router.weight.dtype == moe.e_score_correction_bias.dtype == torch.float32
            assert torch.equal(moe.router.weight, exact[id(moe)])  # not rounded on the way
        else:
            assert moe.router.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters()
               if n.endswith(("embedding.weight", "down_proj", "out_proj.weight")))
    # the MoE tensors as a bfloat16 load makes them (the Mamba layers' A_log, D, dt_bias are another matter:
    # a load keeps them float32, `to` rounds them, as mamba_ssm's models do)
    ours, theirs = model.state_dict(), from_pretrained(folder, dtype="bfloat16").state_dict()
    prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, TopKMoE))
    moe_keys = [k for k in theirs if k.startswith(prefixes)]
    assert moe_keys and all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in moe_keys)
    model.half()
    assert all((m.router.weight.dtype == torch.float32) == fp32_router for m in _routers(model))
    model.double()
    assert all(m.router.weight.dtype == torch.float64 for m in _routers(model))


def test_sigmoid_group_routes_in_float32_under_autocast():
    torch.manual_seed(4)
    moe = TopKMoE(24, 8, num_experts=12, top_k=3, routing="sigmoid_group", gated=False, n_group=4, topk_group=2,
                  dtype=torch.bfloat16)
    assert moe.router.weight.dtype == torch.float32
    x = torch.randn(64, 24, dtype=torch.bfloat16)
    weights, index = moe.route(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # would round the router's product to bfloat16
        in_autocast = moe.route(x)
    assert weights.dtype == torch.float32
    assert torch.equal(in_autocast[0], weights) and torch.equal(in_autocast[1], index)
