"""transformers' Bamba (``bamba``) and Granite-4.0-H (``granitemoehybrid``) configs and tensor names: the Mamba-2
hybrids whose every layer is a mixer (Mamba-2 or attention) followed by an MLP (or MoE), with the ``mamba_*`` fields.

Granite adds the µP multipliers (embedding_multiplier, residual_multiplier, attention_multiplier as the softmax
scale, logits_scaling as the logits' divisor), RoPE over the whole head only with position_embedding_type "rope",
and per layer a shared SwiGLU expert (packed input_linear) plus, with num_local_experts > 0, top-k routed experts.
"""
from __future__ import annotations

from typing import Any, Optional

from mambakit.errors import CheckpointError, MambaKitError
from mambakit.models.hybrid import HybridConfig, HybridLM
from mambakit.models.io.folder import is_int
from mambakit.models.io.hybrid_fields import HF_TOP_KEYS, ROPE_THETA, ConfigReader, key_parts, mixers_of, read_rope

# BambaConfig's defaults (transformers 5.x) for the fields that change the computation
_BAMBA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=128000, tie_word_embeddings=False, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", rms_norm_eps=1e-5, attn_layer_indices=None,
    mamba_n_heads=128, mamba_d_head="auto", mamba_n_groups=1, mamba_d_state=256, mamba_d_conv=4, mamba_expand=2,
    mamba_chunk_size=256, mamba_conv_bias=True, mamba_proj_bias=False, time_step_limit=[0.0, float("inf")],
    attention_bias=False, mlp_bias=False)
_BAMBA_PARTIAL_ROTARY = 0.5  # what BambaConfig sets when rope_parameters does not say
# GraniteMoeHybridConfig's defaults (transformers 5.x) for the fields that change the computation
_GRANITE_DEFAULTS: dict[str, Any] = dict(
    _BAMBA_DEFAULTS, vocab_size=32000, intermediate_size=11008, num_key_value_heads=None, rms_norm_eps=1e-6,
    embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0, attention_multiplier=1.0,
    num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=1024, position_embedding_type=None,
    layer_types=None)


def _heads(r: ConfigReader, d_model: Optional[int]) -> tuple[Optional[int], Optional[int], Optional[int]]:
    """(num_heads, num_heads_kv, head_dim): head_dim when the config gives it, else hidden_size // heads."""
    cfg, heads = r.cfg, r.pos_int("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") if cfg.get("num_key_value_heads") is not None else heads
    if not (is_int(kv_heads) and kv_heads > 0 and heads and heads % kv_heads == 0):
        r.problems.append(f"num_key_value_heads must be a positive divisor of num_attention_heads={heads}, got "
                          f"{kv_heads!r}")
    head_dim = cfg.get("head_dim")
    if head_dim is None and d_model and heads:
        head_dim = d_model // heads
    if not (is_int(head_dim) and head_dim > 0):
        r.problems.append(f"head_dim must be a positive integer, got {head_dim!r}")
        head_dim = None
    return heads, kv_heads, head_dim


def _mamba2(r: ConfigReader, d_model: Optional[int], eps: Optional[float]) -> dict[str, Any]:
    """The Mamba2 keyword arguments from the mamba_* fields (BambaMixer, also Granite's)."""
    cfg, problems = r.cfg, r.problems
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
    if cfg.get("hidden_act") != "silu":
        problems.append(f"hidden_act {cfg.get('hidden_act')!r} is not supported (the Mamba-2 mixers and MLPs use "
                        "'silu')")
    return dict(d_state=d_state, d_conv=d_conv, expand=expand, headdim=d_head, ngroups=m_groups, chunk_size=chunk,
                dt_limit=r.dt_limit(), bias=proj_bias, conv_bias=conv_bias, norm_eps=eps, rmsnorm=True,
                norm_before_gate=False, D_has_hdim=False)


def _build(where: str, problems: list[str], **kwargs: Any) -> HybridConfig:
    if problems:
        raise CheckpointError.listing(f"unsupported {where}", problems)
    try:
        return HybridConfig(**kwargs)
    except MambaKitError as exc:
        raise CheckpointError(f"unsupported {where}: {exc}") from exc


def bamba_config(raw: dict[str, Any], where: str) -> HybridConfig:
    r = ConfigReader(raw, _BAMBA_DEFAULTS)
    d_model, n_layer, vocab = r.pos_int("hidden_size"), r.pos_int("num_hidden_layers"), r.pos_int("vocab_size")
    d_ff, eps = r.pos_int("intermediate_size"), r.pos_num("rms_norm_eps")
    heads, kv_heads, head_dim = _heads(r, d_model)
    attn_bias, mlp_bias, tie = r.flag("attention_bias"), r.flag("mlp_bias"), r.flag("tie_word_embeddings")
    mamba2 = _mamba2(r, d_model, eps)
    rotary, theta = read_rope(r, head_dim, _BAMBA_PARTIAL_ROTARY)
    attn = r.cfg.get("attn_layer_indices") or []
    if not (isinstance(attn, list) and all(is_int(i) and 0 <= i < (n_layer or 0) for i in attn)):
        r.problems.append(f"attn_layer_indices must list layer indices in [0, num_hidden_layers={n_layer}), got "
                          f"{r.cfg.get('attn_layer_indices')!r}")
        attn = []
    layers = [{"mixer": "attention" if i in attn else "mamba2", "mlp": "gated"} for i in range(n_layer or 0)]
    return _build(where, r.problems, d_model=d_model, vocab_size=vocab, layers=layers, norm_epsilon=eps,
                  tie_embeddings=tie, mamba2=mamba2,
                  attention=dict(num_heads=heads, num_heads_kv=kv_heads, head_dim=head_dim, rotary_emb_dim=rotary,
                                 rotary_emb_base=theta, qkv_proj_bias=attn_bias, out_proj_bias=attn_bias,
                                 separate_qkv=True),
                  mlp=dict(d_intermediate=d_ff, activation="silu", bias=mlp_bias))


def granite_config(raw: dict[str, Any], where: str) -> HybridConfig:
    r = ConfigReader(raw, _GRANITE_DEFAULTS)
    cfg, problems = r.cfg, r.problems
    d_model, n_layer, vocab = r.pos_int("hidden_size"), r.pos_int("num_hidden_layers"), r.pos_int("vocab_size")
    eps, tie, attn_bias = r.pos_num("rms_norm_eps"), r.flag("tie_word_embeddings"), r.flag("attention_bias")
    heads, kv_heads, head_dim = _heads(r, d_model)
    mamba2 = _mamba2(r, d_model, eps)
    multipliers = {name: r.pos_num(name) for name in ("embedding_multiplier", "residual_multiplier",
                                                       "logits_scaling", "attention_multiplier")}
    position = cfg.get("position_embedding_type")
    rotary, theta = 0, ROPE_THETA
    if position == "rope":
        # GraniteMoeHybridRotaryEmbedding rotates the whole head (it reads no partial_rotary_factor)
        rotary, theta = read_rope(r, head_dim, 1.0)
        rotary = head_dim
    elif position is not None:
        problems.append(f"position_embedding_type {position!r} is not supported (None or 'rope')")
    types = cfg.get("layer_types", cfg.get("layers_block_type"))
    if types is None and n_layer:
        types = ["linear_attention"] * n_layer
    kinds = {"linear_attention": "mamba2", "full_attention": "attention"}
    if not (isinstance(types, list) and len(types) == (n_layer or 0) and all(t in kinds for t in types)):
        problems.append(f"layer_types must list {n_layer} entries of {list(kinds)}, got {types!r}")
        types = []
    experts, shared = r.need("num_local_experts", lambda v: is_int(v) and v >= 0, "an integer >= 0"), None
    moe: dict[str, Any] = {}
    if experts:
        moe = dict(d_intermediate=r.pos_int("intermediate_size"), num_experts=experts,
                   top_k=r.need("num_experts_per_tok", lambda v: is_int(v) and 0 < v <= experts,
                                f"an integer in [1, num_local_experts={experts}]"), activation="silu")
    shared = r.pos_int("shared_intermediate_size")
    layers = [{"mixer": kinds[t], "mlp": "moe" if experts else "gated"} for t in types]
    return _build(where, problems, d_model=d_model, vocab_size=vocab, layers=layers, norm_epsilon=eps,
                  tie_embeddings=tie, mamba2=mamba2, moe=moe,
                  attention=dict(num_heads=heads, num_heads_kv=kv_heads, head_dim=head_dim, rotary_emb_dim=rotary,
                                 rotary_emb_base=theta, qkv_proj_bias=attn_bias, out_proj_bias=attn_bias,
                                 separate_qkv=True, softmax_scale=multipliers["attention_multiplier"]),
                  mlp=dict(d_intermediate=shared, activation="silu", bias=False, packed=True),
                  embedding_multiplier=multipliers["embedding_multiplier"],
                  residual_multiplier=multipliers["residual_multiplier"],
                  logits_scaling=multipliers["logits_scaling"])


def bamba_key(key: str, config: HybridConfig) -> str:
    """The transformers name of a mambakit key of a Bamba model."""
    parts = key_parts(key, HF_TOP_KEYS)
    if isinstance(parts, str):
        return parts
    i, part, rest = parts
    if part == "mixer":
        attention = config.layers[i]["mixer"] == "attention"
        part = "self_attn" if attention else "mamba"
        if attention and rest.startswith("out_proj."):
            rest = "o_proj." + rest[len("out_proj."):]
    else:
        part = {"norm": "input_layernorm", "norm2": "pre_ff_layernorm", "mlp": "feed_forward"}[part]
    return f"model.layers.{i}.{part}.{rest}"


def _mamba_hf(model: HybridLM, family: str, problems: list[str]) -> dict[str, Any]:
    """The mamba_* config fields of the model's Mamba-2 mixers (none without any)."""
    mambas = mixers_of(model, "Mamba2")
    if not mambas:
        return {}
    m, eps = mambas[0], model.config.norm_epsilon
    if m.D_has_hdim or not m.rmsnorm or m.norm.norm_before_gate:
        problems.append(f"{family}'s Mamba-2 mixers have D per head and the gated norm norm(y * silu(z))")
    elif m.norm.eps != eps:
        problems.append(f"the gated norm's epsilon {m.norm.eps} differs from norm_epsilon {eps}; {family} uses "
                        "rms_norm_eps for both")
    if (m.in_proj.bias is None) != (m.out_proj.bias is None):
        problems.append("in_proj and out_proj must both have a bias or both have none (mamba_proj_bias)")
    return dict(mamba_n_heads=m.nheads, mamba_d_head=m.headdim, mamba_n_groups=m.ngroups, mamba_d_state=m.d_state,
                mamba_d_conv=m.d_conv, mamba_expand=m.expand, mamba_chunk_size=m.chunk_size,
                mamba_conv_bias=m.conv1d.bias is not None, mamba_proj_bias=m.in_proj.bias is not None,
                time_step_limit=[float(m.dt_limit[0]), float(m.dt_limit[1])])


def _attention_hf(model: HybridLM, family: str, problems: list[str]) -> tuple[dict[str, Any], Any]:
    """The attention config fields shared by both families, and the first attention layer (None without any)."""
    attns = mixers_of(model, "MHA")
    if not attns:
        return {}, None
    a = attns[0]
    bias = a.q_proj.bias is not None if a.separate_qkv else False
    if not a.separate_qkv:
        problems.append(f"attention with a packed in_proj has no {family} equivalent (q_proj, k_proj, v_proj)")
    elif (a.out_proj.bias is not None) != bias:
        problems.append("the q/k/v and output projections must all have a bias or none (attention_bias)")
    hf = dict(num_attention_heads=a.num_heads, num_key_value_heads=a.num_heads_kv, attention_bias=bias)
    if a.head_dim * a.num_heads != model.config.d_model:
        hf["head_dim"] = a.head_dim
    return hf, a


def _layers_hf(config: HybridConfig, family: str, mlp_kinds: tuple[str, ...], problems: list[str]) -> None:
    if any(s["mixer"] is None or s["mlp"] not in mlp_kinds for s in config.layers) or \
            len({s["mlp"] for s in config.layers}) > 1:
        problems.append(f"every {family} layer is a mixer (Mamba-2 or attention) followed by the same kind of MLP "
                        f"(one of {list(mlp_kinds)})")
    act = config.mlp.get("activation", "silu")
    if act != "silu" or config.moe.get("activation", "silu") != "silu":
        problems.append(f"MLP activation {act!r} has no {family} equivalent ('silu')")


def bamba_hf(model: HybridLM, problems: list[str]) -> dict[str, Any]:
    config: HybridConfig = model.config
    _layers_hf(config, "Bamba", ("gated",), problems)
    for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if getattr(config, name) != 1.0:
            problems.append(f"{name}={getattr(config, name)} has no Bamba equivalent (1.0)")
    if config.mlp.get("packed"):
        problems.append("a packed gate_up_proj MLP has no Bamba equivalent (gate_proj and up_proj)")
    hf: dict[str, Any] = dict(vocab_size=config.vocab_size, hidden_size=config.d_model,
                              num_hidden_layers=config.n_layer, rms_norm_eps=config.norm_epsilon,
                              tie_word_embeddings=bool(config.tie_embeddings), hidden_act="silu",
                              attn_layer_indices=config.attn_layer_idx or None,
                              intermediate_size=config.mlp.get("d_intermediate"),
                              mlp_bias=bool(config.mlp.get("bias", False)), **_mamba_hf(model, "Bamba", problems))
    attention, a = _attention_hf(model, "Bamba", problems)
    hf.update(attention)
    if a is not None:
        if a.softmax_scale is not None:
            problems.append(f"softmax_scale={a.softmax_scale} has no Bamba equivalent (head_dim ** -0.5)")
        hf["rope_parameters"] = dict(rope_type="default", rope_theta=float(a.rotary_emb_base),
                                     partial_rotary_factor=a.rotary_emb_dim / a.head_dim)
    return hf


def granite_key(key: str, config: HybridConfig) -> str:
    """The transformers name of a mambakit key of a Granite-4.0-H model (the names its files use)."""
    top = {"backbone.embedding.weight": "model.embed_tokens.weight", "backbone.norm_f.weight": "model.norm.weight"}
    parts = key_parts(key, top)
    if isinstance(parts, str):
        return parts
    i, part, rest = parts
    if part == "mixer":
        return bamba_key(key, config)
    if part != "mlp":
        return f"model.layers.{i}.{'input_layernorm' if part == 'norm' else 'post_attention_layernorm'}.{rest}"
    return f"model.layers.{i}.{_GRANITE_MLP.get(rest, 'mlp.' + rest)}"


_GRANITE_MLP = {"gate_up_proj.weight": "shared_mlp.input_linear.weight",
                "down_proj.weight": "shared_mlp.output_linear.weight",
                "shared.gate_up_proj.weight": "shared_mlp.input_linear.weight",
                "shared.down_proj.weight": "shared_mlp.output_linear.weight",
                "moe.router.weight": "block_sparse_moe.router.layer.weight",
                "moe.gate_up_proj": "block_sparse_moe.input_linear.weight",
                "moe.down_proj": "block_sparse_moe.output_linear.weight"}
#: the names transformers 5.x uses in memory, which a file may hold too -> the names of the files
GRANITE_ALIASES = ((r"\.block_sparse_moe\.experts\.gate_up_proj$", ".block_sparse_moe.input_linear.weight"),
                   (r"\.block_sparse_moe\.experts\.down_proj$", ".block_sparse_moe.output_linear.weight"),
                   (r"\.block_sparse_moe\.router\.weight$", ".block_sparse_moe.router.layer.weight"))


def granite_hf(model: HybridLM, problems: list[str]) -> dict[str, Any]:
    config: HybridConfig = model.config
    _layers_hf(config, "Granite-4.0-H", ("gated", "moe"), problems)
    if not config.mlp.get("packed") or config.mlp.get("bias"):
        problems.append("Granite-4.0-H's MLPs pack gate and up projections (packed=True) and have no bias")
    hf: dict[str, Any] = dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layer,
        rms_norm_eps=config.norm_epsilon, tie_word_embeddings=bool(config.tie_embeddings), hidden_act="silu",
        layer_types=["full_attention" if s["mixer"] == "attention" else "linear_attention" for s in config.layers],
        shared_intermediate_size=config.mlp.get("d_intermediate"), embedding_multiplier=config.embedding_multiplier,
        residual_multiplier=config.residual_multiplier, logits_scaling=config.logits_scaling,
        **_mamba_hf(model, "Granite-4.0-H", problems))
    if config.layers[0]["mlp"] == "moe":
        hf.update(num_local_experts=config.moe["num_experts"], num_experts_per_tok=config.moe["top_k"],
                  intermediate_size=config.moe["d_intermediate"])
    else:
        hf.update(num_local_experts=0, intermediate_size=config.mlp.get("d_intermediate"))
    attention, a = _attention_hf(model, "Granite-4.0-H", problems)
    hf.update(attention)
    if a is not None:
        hf["attention_multiplier"] = a.softmax_scale if a.softmax_scale is not None else a.head_dim ** -0.5
        if a.rotary_emb_dim == a.head_dim:
            hf.update(position_embedding_type="rope",
                      rope_parameters=dict(rope_type="default", rope_theta=float(a.rotary_emb_base)))
        elif a.rotary_emb_dim == 0:
            hf["position_embedding_type"] = None
        else:
            problems.append(f"partial RoPE (rotary_emb_dim={a.rotary_emb_dim} of head_dim={a.head_dim}) has no "
                            "Granite-4.0-H equivalent (all of the head or none)")
    return hf
