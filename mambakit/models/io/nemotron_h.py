"""transformers' Nemotron-H (``nemotron_h``) config and tensor names: each layer ONE of a Mamba-2 mixer, attention
without positional encoding, a plain MLP, or a mixture of plain-MLP experts with a shared expert (sigmoid group
routing), from ``layers_block_type`` or the legacy ``hybrid_override_pattern``."""
from __future__ import annotations

import math
from typing import Any

from mambakit.errors import CheckpointError, MambaKitError
from mambakit.layers.moe import check_routing_groups
from mambakit.models.hybrid import HybridConfig, HybridLM
from mambakit.models.io.folder import is_int
from mambakit.models.io.hybrid_fields import ConfigReader, key_parts, mixers_of

# NemotronHConfig's defaults (transformers 5.x) for the fields that change the computation
_NEMOTRON_DEFAULTS: dict[str, Any] = dict(
    vocab_size=131072, hidden_size=4096, tie_word_embeddings=False, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, sliding_window=None, intermediate_size=21504, mlp_hidden_act="relu2", mlp_bias=False,
    ssm_state_size=128, mamba_num_heads=128, mamba_head_dim=64, mamba_hidden_act="silu", n_groups=8, conv_kernel=4,
    time_step_limit=[0.0, math.inf], use_conv_bias=True, chunk_size=128, num_nextn_predict_layers=0, use_bias=False,
    layer_norm_epsilon=1e-5, n_routed_experts=8, moe_intermediate_size=7688,
    moe_shared_expert_intermediate_size=7688, moe_latent_size=None, num_experts_per_tok=2, routed_scaling_factor=1.0,
    n_group=1, topk_group=1, norm_topk_prob=True)
# the older field names NemotronHConfig still reads (they win over the new ones, as there)
_NEMOTRON_LEGACY = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_dt_limit": "time_step_limit",
                    "mamba_conv_bias": "use_conv_bias", "mamba_chunk_size": "chunk_size"}
_NEMOTRON_PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_NEMOTRON_LAYERS = {"linear_attention": {"mixer": "mamba2", "mlp": None},
                    "full_attention": {"mixer": "attention", "mlp": None}, "mlp": {"mixer": None, "mlp": "plain"},
                    "moe": {"mixer": None, "mlp": "moe"}}
# a MoE layer's tensors: mambakit's name (under .mlp.) -> transformers' (under .mixer.)
_MOE_KEYS = {"moe.router.weight": "gate.weight", "moe.e_score_correction_bias": "gate.e_score_correction_bias",
             "moe.experts.": "experts.",
             "moe.latent_in_proj.": "fc1_latent_proj.", "moe.latent_out_proj.": "fc2_latent_proj.",
             "shared.": "shared_experts."}
_MLP_ACTS = ("relu2", "relu", "silu", "gelu")


def _nemotron_layer_types(r: ConfigReader) -> list[str]:
    types = r.cfg.get("layers_block_type", r.cfg.get("layer_types"))
    pattern = r.cfg.get("hybrid_override_pattern")
    if types is None and isinstance(pattern, str):
        bad = sorted(set(pattern) - set(_NEMOTRON_PATTERN))
        if bad:
            r.problems.append(f"hybrid_override_pattern {pattern!r} holds unknown layer letters {bad} (known: "
                              f"{list(_NEMOTRON_PATTERN)})")
            return []
        types = [_NEMOTRON_PATTERN[c] for c in pattern]
    if types is None:
        types = ["linear_attention", "moe", "full_attention", "mlp"]  # NemotronHConfig's default
    if not isinstance(types, list) or not types:
        r.problems.append(f"layers_block_type must be a non-empty list, got {types!r}")
        return []
    unknown = sorted({str(t) for t in types if t not in _NEMOTRON_LAYERS})
    if unknown:
        r.problems.append(f"layers_block_type holds unknown layer types {unknown} (known: {list(_NEMOTRON_LAYERS)})")
    return types if not unknown else []


def _nemotron_moe(r: ConfigReader, act: Any, mlp_bias: Any) -> dict[str, Any]:
    """HybridConfig.moe of the MoE layers: NemotronHMoE's routed experts and shared expert (plain MLPs)."""
    cfg = r.cfg
    if cfg.get("num_local_experts") is not None:  # NemotronHConfig's alias of n_routed_experts
        cfg["n_routed_experts"] = cfg["num_local_experts"]
    moe = dict(d_intermediate=r.pos_int("moe_intermediate_size"), num_experts=r.pos_int("n_routed_experts"),
               top_k=r.pos_int("num_experts_per_tok"), activation=act, routing="sigmoid_group", gated=False,
               per_expert=True,  # the files hold experts.{e}.up_proj / down_proj, as NVIDIA's originals
               n_group=r.pos_int("n_group"), topk_group=r.pos_int("topk_group"),
               norm_topk_prob=r.flag("norm_topk_prob"), routed_scaling_factor=r.pos_num("routed_scaling_factor"),
               latent_size=cfg.get("moe_latent_size"), latent_bias=mlp_bias,
               shared=dict(d_intermediate=r.pos_int("moe_shared_expert_intermediate_size"), activation=act,
                           bias=mlp_bias, gated=False))
    if moe["latent_size"] is not None and not (is_int(moe["latent_size"]) and moe["latent_size"] > 0):
        r.problems.append(f"moe_latent_size must be null or a positive integer, got {moe['latent_size']!r}")
    if r.problems:
        return moe
    try:  # the routing's own checks (groups dividing the experts, top_k within the kept groups, ...)
        check_routing_groups(moe["num_experts"], moe["top_k"], moe["n_group"], moe["topk_group"])
    except MambaKitError as exc:
        r.problems.append(str(exc))
    return moe


def nemotron_config(raw: dict[str, Any], where: str) -> HybridConfig:
    raw = dict(raw)
    for old, new in _NEMOTRON_LEGACY.items():
        if raw.get(old) is not None:
            raw[new] = raw[old]
    r = ConfigReader(raw, _NEMOTRON_DEFAULTS)
    cfg, problems = r.cfg, r.problems
    types = _nemotron_layer_types(r)
    d_model, vocab = r.pos_int("hidden_size"), r.pos_int("vocab_size")
    heads, head_dim, d_ff = r.pos_int("num_attention_heads"), r.pos_int("head_dim"), r.pos_int("intermediate_size")
    kv_heads = cfg.get("num_key_value_heads") if cfg.get("num_key_value_heads") is not None else heads
    if not (is_int(kv_heads) and kv_heads > 0 and heads and heads % kv_heads == 0):
        problems.append(f"num_key_value_heads must be a positive divisor of num_attention_heads={heads}, got "
                        f"{kv_heads!r}")
    if cfg.get("sliding_window") is not None:
        problems.append(f"sliding_window {cfg['sliding_window']!r} is not supported (full attention only)")
    if cfg.get("mamba_hidden_act") != "silu":
        problems.append(f"mamba_hidden_act {cfg.get('mamba_hidden_act')!r} is not supported (Mamba-2 uses 'silu')")
    act = cfg.get("mlp_hidden_act")
    if act not in _MLP_ACTS:
        problems.append(f"mlp_hidden_act {act!r} is not supported; supported: {list(_MLP_ACTS)}")
    n_mtp = cfg.get("num_nextn_predict_layers")
    if n_mtp not in (0, None):
        problems.append(f"num_nextn_predict_layers={n_mtp!r}: multi-token-prediction heads are not supported")
    eps = r.pos_num("layer_norm_epsilon")
    moe = _nemotron_moe(r, act, cfg.get("mlp_bias")) if "moe" in types else {}
    r.flag("tie_word_embeddings")  # checked, but NemotronHForCausalLM ties nothing: lm_head is always its own tensor
    mlp_bias, bias, conv_bias = r.flag("mlp_bias"), r.flag("use_bias"), r.flag("use_conv_bias")
    d_state, m_heads, d_head = r.pos_int("ssm_state_size"), r.pos_int("mamba_num_heads"), r.pos_int("mamba_head_dim")
    m_groups, d_conv, chunk = r.pos_int("n_groups"), r.pos_int("conv_kernel"), r.pos_int("chunk_size")
    # dt is clamped to time_step_limit (default [0, inf): no clamp), as on the mamba_ssm kernel path of NVIDIA's
    # original and in transformers >= 5.25; time_step_min only sets the range dt_bias is initialised in.
    # transformers < 5.25 clamped its prefill's dt to [time_step_min, inf) instead (its decode step's not at all),
    # as the CPU fallback of NVIDIA's original does: an upstream bug, fixed in 5.25
    dt_limit = r.dt_limit()
    expand = None
    if None not in (m_heads, d_head, d_model):
        if (m_heads * d_head) % d_model:
            problems.append(f"the Mamba width mamba_num_heads * mamba_head_dim = {m_heads * d_head} must be a "
                            f"multiple of hidden_size = {d_model}")
        else:
            expand = m_heads * d_head // d_model
        if m_groups and m_heads % m_groups:
            problems.append(f"mamba_num_heads {m_heads} must be divisible by n_groups {m_groups}")
    if problems:
        raise CheckpointError.listing(f"unsupported {where}", problems)
    try:
        return HybridConfig(
            d_model=d_model, vocab_size=vocab, layers=[dict(_NEMOTRON_LAYERS[t]) for t in types], norm_epsilon=eps,
            tie_embeddings=False,
            mamba2=dict(d_state=d_state, d_conv=d_conv, expand=expand, headdim=d_head, ngroups=m_groups,
                        chunk_size=chunk, dt_limit=dt_limit, bias=bias, conv_bias=conv_bias,
                        norm_eps=eps, rmsnorm=True, norm_before_gate=False, D_has_hdim=False),
            # NemotronHAttention has no biases whatever attention_bias says, and no positional encoding
            attention=dict(num_heads=heads, num_heads_kv=kv_heads, head_dim=head_dim, rotary_emb_dim=0,
                           qkv_proj_bias=False, out_proj_bias=False, separate_qkv=True),
            mlp=dict(d_intermediate=d_ff, activation=act, bias=mlp_bias), moe=moe)
    except MambaKitError as exc:
        raise CheckpointError(f"unsupported {where}: {exc}") from exc


def nemotron_key(key: str, config: HybridConfig) -> str:
    """The transformers name of a mambakit key of a Nemotron-H model (each layer holds one part: norm + mixer; files
    name the base model ``backbone``, as NVIDIA's originals do)."""
    top = {"backbone.embedding.weight": "backbone.embeddings.weight"}
    parts = key_parts(key, top)
    if isinstance(parts, str):
        return parts
    i, part, rest = parts
    if part == "mixer" and config.layers[i]["mixer"] == "attention" and rest.startswith("out_proj."):
        rest = "o_proj." + rest[len("out_proj."):]
    if part == "mlp" and config.layers[i]["mlp"] == "moe":
        for ours, theirs in _MOE_KEYS.items():
            if rest.startswith(ours):
                rest = theirs + rest[len(ours):]
                break
    return f"backbone.layers.{i}.{'norm' if part in ('norm', 'norm2') else 'mixer'}.{rest}"


def nemotron_hf(model: HybridLM, problems: list[str]) -> dict[str, Any]:
    config: HybridConfig = model.config
    kinds = {"mamba2": "linear_attention", "attention": "full_attention", "plain": "mlp", "moe": "moe"}
    types = []
    for i, spec in enumerate(config.layers):
        parts = [p for p in (spec["mixer"], spec["mlp"]) if p is not None]
        if len(parts) != 1 or parts[0] not in kinds:
            problems.append(f"layer {i} ({spec}) must be exactly one of a Mamba-2 mixer, attention, a plain MLP or "
                            "a MoE")
        else:
            types.append(kinds[parts[0]])
    for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if getattr(config, name) != 1.0:
            problems.append(f"{name}={getattr(config, name)} has no Nemotron-H equivalent (1.0)")
    act = config.mlp.get("activation", "silu")
    if act not in _MLP_ACTS:
        problems.append(f"MLP activation {act!r} has no Nemotron-H equivalent ({list(_MLP_ACTS)})")
    if config.tie_embeddings:
        problems.append("tied embeddings have no Nemotron-H equivalent (NemotronHForCausalLM never ties lm_head)")
    hf: dict[str, Any] = dict(vocab_size=config.vocab_size, hidden_size=config.d_model, layers_block_type=types,
                              layer_norm_epsilon=config.norm_epsilon, tie_word_embeddings=False,
                              mlp_hidden_act=act, mamba_hidden_act="silu", num_nextn_predict_layers=0)
    if "d_intermediate" in config.mlp:
        hf.update(intermediate_size=config.mlp["d_intermediate"], mlp_bias=bool(config.mlp.get("bias", False)))
    if "moe" in types:
        hf.update(_nemotron_moe_hf(config.moe, act, problems))
    mambas, attns = mixers_of(model, "Mamba2"), mixers_of(model, "MHA")
    if mambas:
        m = mambas[0]
        if m.D_has_hdim or not m.rmsnorm or m.norm.norm_before_gate or m.norm.eps != config.norm_epsilon:
            problems.append("Nemotron-H's Mamba-2 mixers have D per head and norm(y * silu(z)) with the block "
                            "norms' epsilon")
        if (m.in_proj.bias is None) != (m.out_proj.bias is None):
            problems.append("in_proj and out_proj must both have a bias or both have none (use_bias)")
        hf.update(mamba_num_heads=m.nheads, mamba_head_dim=m.headdim, n_groups=m.ngroups, ssm_state_size=m.d_state,
                  conv_kernel=m.d_conv, expand=m.expand, chunk_size=m.chunk_size,
                  use_conv_bias=m.conv1d.bias is not None, use_bias=m.in_proj.bias is not None,
                  time_step_limit=[float(m.dt_limit[0]), float(m.dt_limit[1])])
    if attns:
        a = attns[0]
        if not a.separate_qkv or a.q_proj.bias is not None or a.out_proj.bias is not None:
            problems.append("Nemotron-H attention has separate q/k/v projections without biases")
        if a.rotary_emb_dim or a.softmax_scale is not None:
            problems.append("Nemotron-H attention has no positional encoding and the softmax scale head_dim ** -0.5")
        hf.update(num_attention_heads=a.num_heads, num_key_value_heads=a.num_heads_kv, head_dim=a.head_dim,
                  attention_bias=False)
    return hf


def _nemotron_moe_hf(moe: dict[str, Any], act: str, problems: list[str]) -> dict[str, Any]:
    """The config.json fields of HybridConfig.moe for NemotronHMoE (its experts and shared expert plain MLPs with
    the model's MLP activation, sigmoid group routing)."""
    shared = moe.get("shared") or {}
    fits = (moe.get("routing") == "sigmoid_group" and moe.get("gated") is False and moe.get("per_expert") is True
            and moe.get("activation", "silu") == act and shared.get("gated") is False
            and shared.get("activation", "silu") == act and "d_intermediate" in shared
            and bool(shared.get("bias", False)) == bool(moe.get("latent_bias", False)))
    if not fits:
        problems.append("Nemotron-H MoE layers have plain-MLP experts and a plain-MLP shared expert with the MLP "
                        f"activation and one bias setting, routed by 'sigmoid_group'; got {moe}")
        return {}
    return dict(n_routed_experts=moe["num_experts"], num_experts_per_tok=moe["top_k"],
                moe_intermediate_size=moe["d_intermediate"],
                moe_shared_expert_intermediate_size=shared["d_intermediate"],
                moe_latent_size=moe.get("latent_size"), n_group=moe.get("n_group", 1),
                topk_group=moe.get("topk_group", 1), norm_topk_prob=moe.get("norm_topk_prob", True),
                routed_scaling_factor=moe.get("routed_scaling_factor", 1.0))
