"""transformers' Jamba (``jamba``, `JambaForCausalLM`) config and tensor names.

Every layer is a mixer followed by a feed-forward part, each pre-norm with a residual. The mixer is grouped-query
attention without positional encoding and without biases at the layers i with i % attn_layer_period ==
attn_layer_offset, a Mamba-1 mixer elsewhere whose dt_low, B and C go through learned RMSNorms (dt_layernorm,
b_layernorm, c_layernorm, epsilon rms_norm_eps) after x_proj. The feed-forward part is, at i % expert_layer_period ==
expert_layer_offset when num_experts > 1, num_experts SwiGLU experts routed by softmax over all router logits then
the top num_experts_per_tok of those probabilities (not renormalised), else one SwiGLU MLP.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from mambakit.models.hybrid import HybridConfig, HybridLM
from mambakit.models.io.bamba import _build, _heads, bamba_key
from mambakit.models.io.folder import is_int
from mambakit.models.io.hybrid_fields import ConfigReader, mixers_of

# JambaConfig's defaults (transformers 5.x) for the fields that change the computation
_JAMBA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=65536, tie_word_embeddings=False, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", rms_norm_eps=1e-6, num_experts_per_tok=2,
    num_experts=16, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=8, attn_layer_offset=4,
    mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank="auto", mamba_conv_bias=True,
    mamba_proj_bias=False)
#: mambakit's names of the mixer's norm weights -> transformers'
_NORMS = {"dt_norm_weight": "dt_layernorm.weight", "B_norm_weight": "b_layernorm.weight",
          "C_norm_weight": "c_layernorm.weight"}


def _period(r: ConfigReader, what: str) -> tuple[Optional[int], Optional[int]]:
    period = r.pos_int(f"{what}_layer_period")
    offset = r.need(f"{what}_layer_offset", lambda v: is_int(v) and v >= 0, "an integer >= 0")
    if period is not None and offset is not None and offset >= period:
        r.problems.append(f"{what}_layer_offset {offset} must be smaller than {what}_layer_period {period}")
        return None, None
    return period, offset


def jamba_config(raw: dict[str, Any], where: str) -> HybridConfig:
    r = ConfigReader(raw, _JAMBA_DEFAULTS)
    cfg, problems = r.cfg, r.problems
    d_model, n_layer, vocab = r.pos_int("hidden_size"), r.pos_int("num_hidden_layers"), r.pos_int("vocab_size")
    d_ff, eps, tie = r.pos_int("intermediate_size"), r.pos_num("rms_norm_eps"), r.flag("tie_word_embeddings")
    heads, kv_heads, head_dim = _heads(r, d_model)
    if cfg.get("hidden_act") != "silu":
        problems.append(f"hidden_act {cfg.get('hidden_act')!r} is not supported (the Mamba mixers and MLPs use "
                        "'silu')")
    dt_rank = cfg.get("mamba_dt_rank")
    if dt_rank == "auto" and d_model:
        dt_rank = math.ceil(d_model / 16)
    if not (is_int(dt_rank) and dt_rank > 0):
        problems.append(f"mamba_dt_rank must be a positive integer or 'auto', got {cfg.get('mamba_dt_rank')!r}")
    mamba = dict(d_state=r.pos_int("mamba_d_state"), d_conv=r.pos_int("mamba_d_conv"),
                 expand=r.pos_int("mamba_expand"), dt_rank=dt_rank, conv_bias=r.flag("mamba_conv_bias"),
                 bias=r.flag("mamba_proj_bias"), bcdt_rms=True, bcdt_rms_eps=eps, bcdt_rms_weight=True)
    experts, top_k = r.pos_int("num_experts"), None
    if experts is not None and experts > 1:  # one expert means dense MLPs: num_experts_per_tok is then unread
        top_k = r.need("num_experts_per_tok", lambda v: is_int(v) and 0 < v <= experts,
                       f"an integer in [1, num_experts={experts}]")
    attn_period, attn_offset = _period(r, "attn")
    moe_period, moe_offset = _period(r, "expert")
    layers = []
    if None not in (n_layer, attn_period, moe_period):
        for i in range(n_layer):
            routed = experts is not None and experts > 1 and i % moe_period == moe_offset
            layers.append({"mixer": "attention" if i % attn_period == attn_offset else "mamba",
                           "mlp": "routed" if routed else "gated"})
    moe = {}
    if any(s["mlp"] == "routed" for s in layers):
        moe = dict(d_intermediate=d_ff, num_experts=experts, top_k=top_k, activation="silu",
                   routing="softmax_topk", per_expert=True)
    return _build(where, problems, d_model=d_model, vocab_size=vocab, layers=layers, norm_epsilon=eps,
                  tie_embeddings=tie, mamba=mamba, moe=moe,
                  attention=dict(num_heads=heads, num_heads_kv=kv_heads, head_dim=head_dim, rotary_emb_dim=0,
                                 qkv_proj_bias=False, out_proj_bias=False, separate_qkv=True),
                  mlp=dict(d_intermediate=d_ff, activation="silu", bias=False))


def jamba_key(key: str, config: HybridConfig) -> str:
    """The transformers name of a mambakit key of a Jamba model."""
    if key == "backbone.norm_f.weight":
        return "model.final_layernorm.weight"
    name = bamba_key(key, config)
    prefix, _, last = name.rpartition(".mamba.")
    if prefix and last in _NORMS:
        return f"{prefix}.mamba.{_NORMS[last]}"
    return name


def _pattern(flags: list[bool]) -> Optional[tuple[int, int]]:
    """(period, offset) with flags[i] == (i % period == offset) for every i, or None."""
    n = len(flags)
    for period in range(1, n + 2):
        for offset in range(period):
            if all(f == (i % period == offset) for i, f in enumerate(flags)):
                return period, offset
    return None


def jamba_hf(model: HybridLM, problems: list[str]) -> dict[str, Any]:
    config: HybridConfig = model.config
    layers, eps = config.layers, config.norm_epsilon
    if any(s["mixer"] not in ("mamba", "attention") or s["mlp"] not in ("gated", "routed") for s in layers):
        problems.append("every Jamba layer is a Mamba-1 or attention mixer followed by a gated MLP or routed experts")
    for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if getattr(config, name) != 1.0:
            problems.append(f"{name}={getattr(config, name)} has no Jamba equivalent (1.0)")
    mlp, moe = config.mlp, config.moe
    if mlp.get("activation", "silu") != "silu" or mlp.get("bias") or mlp.get("packed"):
        problems.append("Jamba's MLPs are SwiGLU ('silu') with separate gate_proj / up_proj and no bias")
    attn = _pattern([s["mixer"] == "attention" for s in layers])
    routed = _pattern([s["mlp"] == "routed" for s in layers])
    if attn is None or routed is None:
        problems.append("the attention layers and the expert layers must each be every `period` layers from an "
                        "`offset` (attn_layer_period / offset, expert_layer_period / offset)")
        attn, routed = attn or (1, 0), routed or (1, 0)
    hf: dict[str, Any] = dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layer,
        rms_norm_eps=eps, tie_word_embeddings=bool(config.tie_embeddings), hidden_act="silu",
        intermediate_size=mlp.get("d_intermediate"), attn_layer_period=attn[0], attn_layer_offset=attn[1],
        expert_layer_period=routed[0], expert_layer_offset=routed[1], num_experts=1, num_experts_per_tok=1)
    if any(s["mlp"] == "routed" for s in layers):
        if moe.get("routing") != "softmax_topk" or not moe.get("per_expert") or moe.get("num_experts", 0) < 2 or \
                moe.get("activation", "silu") != "silu" or moe.get("d_intermediate") != mlp.get("d_intermediate"):
            problems.append("Jamba's routed experts are >= 2 per-expert SwiGLU MLPs as wide as the dense MLP "
                            "(intermediate_size), routed by softmax then top-k (routing 'softmax_topk')")
        hf.update(num_experts=moe.get("num_experts"), num_experts_per_tok=moe.get("top_k"))
    mambas = mixers_of(model, "Mamba")
    if mambas:
        m = mambas[0]
        if m.dt_norm_weight is None or m.bcdt_rms_eps != eps:
            problems.append(f"Jamba's Mamba mixers have learned dt / B / C norms (bcdt_rms_weight) with epsilon "
                            f"rms_norm_eps={eps}")
        if (m.in_proj.bias is None) != (m.out_proj.bias is None):
            problems.append("in_proj and out_proj must both have a bias or both have none (mamba_proj_bias)")
        hf.update(mamba_d_state=m.d_state, mamba_d_conv=m.d_conv, mamba_expand=m.expand, mamba_dt_rank=m.dt_rank,
                  mamba_conv_bias=m.conv1d.bias is not None, mamba_proj_bias=m.in_proj.bias is not None)
    attns = mixers_of(model, "MHA")
    if attns:
        a = attns[0]
        if not a.separate_qkv or a.q_proj.bias is not None or a.out_proj.bias is not None or a.rotary_emb_dim or \
                a.softmax_scale is not None:
            problems.append("Jamba's attention has separate q/k/v projections, no biases, no positional encoding "
                            "and the softmax scale head_dim ** -0.5")
        hf.update(num_attention_heads=a.num_heads, num_key_value_heads=a.num_heads_kv)
        if a.head_dim * a.num_heads != config.d_model:
            hf["head_dim"] = a.head_dim
    return hf
