"""transformers' Bamba (``bamba``) and Granite-4.0-H (``granitemoehybrid``) configs and tensor names: the Mamba-2
hybrids whose every layer is a mixer (Mamba-2 or attention) followed by an MLP (or MoE), with the ``mamba_*`` fields.
"""
from __future__ import annotations

from typing import Any

from mambakit.errors import CheckpointError, MambaKitError
from mambakit.models.hybrid import HybridConfig, HybridLM
from mambakit.models.io.folder import is_int
from mambakit.models.io.hybrid_fields import LAYER_KEY, ConfigReader, mixers_of, read_rope

# BambaConfig's defaults (transformers 5.x) for the fields that change the computation
_BAMBA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=128000, tie_word_embeddings=False, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", rms_norm_eps=1e-5, attn_layer_indices=None,
    mamba_n_heads=128, mamba_d_head="auto", mamba_n_groups=1, mamba_d_state=256, mamba_d_conv=4, mamba_expand=2,
    mamba_chunk_size=256, mamba_conv_bias=True, mamba_proj_bias=False, time_step_limit=[0.0, float("inf")],
    attention_bias=False, mlp_bias=False)
_BAMBA_PARTIAL_ROTARY = 0.5  # what BambaConfig sets when rope_parameters does not say


def bamba_config(raw: dict[str, Any], where: str) -> HybridConfig:
    r = ConfigReader(raw, _BAMBA_DEFAULTS)
    cfg, problems = r.cfg, r.problems
    d_model, n_layer, vocab = r.pos_int("hidden_size"), r.pos_int("num_hidden_layers"), r.pos_int("vocab_size")
    d_ff, heads = r.pos_int("intermediate_size"), r.pos_int("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") if cfg.get("num_key_value_heads") is not None else heads
    if not (is_int(kv_heads) and kv_heads > 0 and heads and heads % kv_heads == 0):
        problems.append(f"num_key_value_heads must be a positive divisor of num_attention_heads={heads}, got "
                        f"{kv_heads!r}")
    head_dim = cfg.get("head_dim")
    if head_dim is None and d_model and heads:
        head_dim = d_model // heads
    if not (is_int(head_dim) and head_dim > 0):
        problems.append(f"head_dim must be a positive integer, got {head_dim!r}")
        head_dim = None
    if cfg.get("hidden_act") != "silu":
        problems.append(f"hidden_act {cfg.get('hidden_act')!r} is not supported (Bamba's mixers and MLPs use 'silu')")
    eps = r.pos_num("rms_norm_eps")
    attn_bias, mlp_bias, tie = r.flag("attention_bias"), r.flag("mlp_bias"), r.flag("tie_word_embeddings")
    conv_bias, proj_bias = r.flag("mamba_conv_bias"), r.flag("mamba_proj_bias")
    m_heads, m_groups = r.pos_int("mamba_n_heads"), r.pos_int("mamba_n_groups")
    d_state, d_conv = r.pos_int("mamba_d_state"), r.pos_int("mamba_d_conv")
    expand, chunk = r.pos_int("mamba_expand"), r.pos_int("mamba_chunk_size")
    d_head = cfg.get("mamba_d_head")
    if d_head == "auto" and None not in (expand, d_model, m_heads):
        d_head = expand * d_model // m_heads
    if not (is_int(d_head) and d_head > 0):
        problems.append(f"mamba_d_head must be a positive integer or 'auto', got {cfg.get('mamba_d_head')!r}")
    elif None not in (expand, d_model, m_heads) and d_head * m_heads != expand * d_model:
        problems.append(f"mamba_n_heads * mamba_d_head = {m_heads} * {d_head} must equal mamba_expand * hidden_size "
                        f"= {expand} * {d_model}")
    elif m_heads and m_groups and m_heads % m_groups:
        problems.append(f"mamba_n_heads {m_heads} must be divisible by mamba_n_groups {m_groups}")
    dt_limit = r.dt_limit()
    rotary, theta = read_rope(r, head_dim, _BAMBA_PARTIAL_ROTARY)
    attn = cfg.get("attn_layer_indices") or []
    if not (isinstance(attn, list) and all(is_int(i) and 0 <= i < (n_layer or 0) for i in attn)):
        problems.append(f"attn_layer_indices must list layer indices in [0, num_hidden_layers={n_layer}), got "
                        f"{cfg.get('attn_layer_indices')!r}")
        attn = []
    if problems:
        raise CheckpointError.listing(f"unsupported {where}", problems)
    layers = [{"mixer": "attention" if i in attn else "mamba2", "mlp": "gated"} for i in range(n_layer)]
    try:
        return HybridConfig(
            d_model=d_model, vocab_size=vocab, layers=layers, norm_epsilon=eps, tie_embeddings=tie,
            mamba2=dict(d_state=d_state, d_conv=d_conv, expand=expand, headdim=d_head, ngroups=m_groups,
                        chunk_size=chunk, dt_limit=dt_limit, bias=proj_bias, conv_bias=conv_bias, norm_eps=eps,
                        rmsnorm=True, norm_before_gate=False, D_has_hdim=False),
            attention=dict(num_heads=heads, num_heads_kv=kv_heads, head_dim=head_dim, rotary_emb_dim=rotary,
                           rotary_emb_base=theta, qkv_proj_bias=attn_bias, out_proj_bias=attn_bias,
                           separate_qkv=True),
            mlp=dict(d_intermediate=d_ff, activation="silu", bias=mlp_bias))
    except MambaKitError as exc:
        raise CheckpointError(f"unsupported {where}: {exc}") from exc


def bamba_key(key: str, config: HybridConfig) -> str:
    """The transformers name of a mambakit key of a Bamba model."""
    top = {"backbone.embedding.weight": "model.embed_tokens.weight",
           "backbone.norm_f.weight": "model.final_layernorm.weight"}
    if key in top:
        return top[key]
    m = LAYER_KEY.match(key)
    if m is None:
        return key
    i, part, rest = int(m.group(1)), m.group(2), m.group(3)
    if part == "mixer":
        attention = config.layers[i]["mixer"] == "attention"
        part = "self_attn" if attention else "mamba"
        if attention and rest.startswith("out_proj."):
            rest = "o_proj." + rest[len("out_proj."):]
    else:
        part = {"norm": "input_layernorm", "norm2": "pre_ff_layernorm", "mlp": "feed_forward"}[part]
    return f"model.layers.{i}.{part}.{rest}"


def bamba_hf(model: HybridLM, problems: list[str]) -> dict[str, Any]:
    config: HybridConfig = model.config
    if any(s["mlp"] != "gated" or s["mixer"] is None for s in config.layers):
        problems.append("every Bamba layer is a mixer (Mamba-2 or attention) followed by a gated MLP")
    for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if getattr(config, name) != 1.0:
            problems.append(f"{name}={getattr(config, name)} has no Bamba equivalent (1.0)")
    if config.mlp.get("activation", "silu") != "silu":
        problems.append(f"MLP activation {config.mlp.get('activation')!r} has no Bamba equivalent ('silu')")
    hf: dict[str, Any] = dict(vocab_size=config.vocab_size, hidden_size=config.d_model,
                              num_hidden_layers=config.n_layer, rms_norm_eps=config.norm_epsilon,
                              tie_word_embeddings=bool(config.tie_embeddings), hidden_act="silu",
                              attn_layer_indices=config.attn_layer_idx or None,
                              intermediate_size=config.mlp.get("d_intermediate"),
                              mlp_bias=bool(config.mlp.get("bias", False)))
    mambas, attns = mixers_of(model, "Mamba2"), mixers_of(model, "MHA")
    if mambas:
        m = mambas[0]
        if m.D_has_hdim or not m.rmsnorm or m.norm.norm_before_gate:
            problems.append("Bamba's Mamba-2 mixers have D per head and the gated norm norm(y * silu(z))")
        elif m.norm.eps != config.norm_epsilon:
            problems.append(f"the gated norm's epsilon {m.norm.eps} differs from norm_epsilon {config.norm_epsilon}; "
                            "Bamba uses rms_norm_eps for both")
        if (m.in_proj.bias is None) != (m.out_proj.bias is None):
            problems.append("in_proj and out_proj must both have a bias or both have none (mamba_proj_bias)")
        hf.update(mamba_n_heads=m.nheads, mamba_d_head=m.headdim, mamba_n_groups=m.ngroups, mamba_d_state=m.d_state,
                  mamba_d_conv=m.d_conv, mamba_expand=m.expand, mamba_chunk_size=m.chunk_size,
                  mamba_conv_bias=m.conv1d.bias is not None, mamba_proj_bias=m.in_proj.bias is not None,
                  time_step_limit=[float(m.dt_limit[0]), float(m.dt_limit[1])])
    if attns:
        a = attns[0]
        bias = a.q_proj.bias is not None if a.separate_qkv else False
        if not a.separate_qkv:
            problems.append("attention with a packed in_proj has no Bamba equivalent (q_proj, k_proj, v_proj)")
        elif (a.out_proj.bias is not None) != bias:
            problems.append("the q/k/v and output projections must all have a bias or none (attention_bias)")
        if a.softmax_scale is not None:
            problems.append(f"softmax_scale={a.softmax_scale} has no Bamba equivalent (head_dim ** -0.5)")
        hf.update(num_attention_heads=a.num_heads, num_key_value_heads=a.num_heads_kv, attention_bias=bias,
                  rope_parameters=dict(rope_type="default", rope_theta=float(a.rotary_emb_base),
                                       partial_rotary_factor=a.rotary_emb_dim / a.head_dim))
        if a.head_dim * a.num_heads != config.d_model:
            hf["head_dim"] = a.head_dim
    return hf
