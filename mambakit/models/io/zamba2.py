"""transformers' Zamba2 (``zamba2``, `Zamba2ForCausalLM`) config and tensor names.

Every layer is a pre-norm Mamba-2 mixer with a residual (the gated norm's epsilon fixed at 1e-5, the conv always
with a bias, dt clamped to [time_step_min, inf)). The layers listed "hybrid" in layers_block_type first run a shared
transformer block (`mambakit.layers.shared_block`) on cat([h, token embeddings]): the j-th hybrid layer uses block
j % num_mem_blocks, with its own adapters (q / k / v with use_shared_attention_adapter, gate_up always, rank
adapter_rank) and its own linear, and its mixer reads RMSNorm(h + linear(block(...))). In the files a block's
weights, and the adapters of all its uses, live under the first layer that uses it
(``model.layers.{first}.shared_transformer.*``; the adapters of the j-th hybrid layer at index j of the lists).
transformers ties the blocks together only with tie_word_embeddings true; untied configs with hybrid layers (each
layer then with its own unshared copy) are refused.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

from mambakit.layers.mlp import ACTIVATIONS
from mambakit.models.hybrid import HybridConfig, HybridLM
from mambakit.models.io.bamba import _build
from mambakit.models.io.folder import is_int, is_number
from mambakit.models.io.hybrid_fields import HF_TOP_KEYS, ROPE_THETA, ConfigReader, key_parts, read_rope

# Zamba2Config's defaults (transformers 5.x) for the fields that change the computation
_ZAMBA2_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=2560, num_hidden_layers=54, layers_block_type=None, mamba_d_state=64,
    mamba_d_conv=4, mamba_expand=2, mamba_ngroups=1, time_step_min=0.001, n_mamba_heads=8, chunk_size=256,
    add_bias_linear=False, intermediate_size=None, hidden_act="gelu", num_attention_heads=32,
    num_key_value_heads=None, num_mem_blocks=1, use_shared_attention_adapter=False, adapter_rank=128,
    use_mem_rope=False, rms_norm_eps=1e-5, tie_word_embeddings=True)
_MIXER_NORM_EPS = 1e-5  # Zamba2MambaMixer's gated norm, whatever rms_norm_eps says
_MAMBA_TYPES = ("linear_attention", "mamba")  # the second the legacy name transformers still reads
_ACTS = tuple(sorted(ACTIVATIONS))


def _default_types() -> list[str]:
    """Zamba2Config's layers_block_type when the config gives none (54 layers)."""
    m, h = "linear_attention", "hybrid"
    return [m] + ([m] * 5 + [h]) * 7 + [m] * 4 + [h] + [m] * 3 + [h] + [m] * 2


def zamba2_config(raw: dict[str, Any], where: str) -> HybridConfig:
    r = ConfigReader(raw, _ZAMBA2_DEFAULTS)
    cfg, problems = r.cfg, r.problems
    d_model, n_layer, vocab = r.pos_int("hidden_size"), r.pos_int("num_hidden_layers"), r.pos_int("vocab_size")
    eps, tie, bias = r.pos_num("rms_norm_eps"), r.flag("tie_word_embeddings"), r.flag("add_bias_linear")
    heads, m_heads, m_groups = r.pos_int("num_attention_heads"), r.pos_int("n_mamba_heads"), r.pos_int("mamba_ngroups")
    d_state, d_conv, expand = r.pos_int("mamba_d_state"), r.pos_int("mamba_d_conv"), r.pos_int("mamba_expand")
    chunk, blocks, rank = r.pos_int("chunk_size"), r.pos_int("num_mem_blocks"), r.pos_int("adapter_rank")
    attn_adapters, rope = r.flag("use_shared_attention_adapter"), r.flag("use_mem_rope")
    dt_min = r.need("time_step_min", lambda v: is_number(v) and 0 <= v < math.inf, "a number >= 0")
    d_ff = cfg.get("intermediate_size") or (4 * d_model if d_model else None)
    if not (is_int(d_ff) and d_ff > 0):
        problems.append(f"intermediate_size must be a positive integer, got {cfg.get('intermediate_size')!r}")
    act = cfg.get("hidden_act")
    if act not in ACTIVATIONS:
        problems.append(f"hidden_act {act!r} is not supported; supported: {list(_ACTS)}")
    kv_heads = cfg.get("num_key_value_heads") if cfg.get("num_key_value_heads") is not None else heads
    head_dim = None
    if d_model and heads:
        if (2 * d_model) % heads:
            problems.append(f"num_attention_heads {heads} must divide the shared attention's width 2 * hidden_size "
                            f"= {2 * d_model}")
        head_dim = 2 * d_model // heads
        if not (is_int(kv_heads) and kv_heads > 0 and heads % kv_heads == 0):
            problems.append(f"num_key_value_heads must be a positive divisor of num_attention_heads={heads}, got "
                            f"{kv_heads!r}")
        elif attn_adapters and kv_heads != heads:
            problems.append(f"use_shared_attention_adapter needs num_key_value_heads == num_attention_heads (the k and "
                            f"v adapters are 2 * hidden_size wide), got {kv_heads} and {heads}")
    if d_model and expand and m_heads:
        if (expand * d_model) % m_heads:
            problems.append(f"n_mamba_heads {m_heads} must divide mamba_expand * hidden_size = {expand * d_model}")
        elif m_groups and m_heads % m_groups:
            problems.append(f"n_mamba_heads {m_heads} must be divisible by mamba_ngroups {m_groups}")
    theta = ROPE_THETA
    if rope:  # Zamba2RotaryEmbedding rotates the whole head (it reads no partial_rotary_factor)
        _, theta = read_rope(r, head_dim, 1.0)
    types = cfg.get("layers_block_type")
    if types is None and n_layer:
        types = _default_types()
    if not (isinstance(types, list) and len(types) == (n_layer or 0) and
            all(t in (*_MAMBA_TYPES, "hybrid") for t in types)):
        problems.append(f"layers_block_type must list {n_layer} entries of {[*_MAMBA_TYPES, 'hybrid']}, got {types!r}")
        types = []
    layers, uses = [], 0
    for t in types:
        layers.append({"mixer": "mamba2", "mlp": None})
        if t == "hybrid" and blocks:
            layers[-1]["shared"] = uses % blocks
            uses += 1
    shared: dict[str, Any] = {}
    if uses and tie is False:
        problems.append("tie_word_embeddings false with hybrid layers is not supported: transformers then ties "
                        "nothing, giving every hybrid layer its own copy of the shared block (with adapters it never "
                        "uses)")
    if uses:
        shared = dict(num_blocks=min(blocks, uses), adapter_rank=rank, attention_adapters=attn_adapters,
                      num_heads=heads, num_heads_kv=kv_heads, d_intermediate=d_ff, activation=act, bias=bias,
                      rotary=rope, rotary_emb_base=theta, norm_epsilon=eps)
    mamba2 = dict(d_state=d_state, d_conv=d_conv, expand=expand, headdim=(expand * d_model // m_heads) if None not in
                  (expand, d_model, m_heads) else None, ngroups=m_groups, chunk_size=chunk,
                  dt_limit=(float(dt_min or 0.0), math.inf), bias=bias, conv_bias=True, norm_eps=_MIXER_NORM_EPS,
                  rmsnorm=True, norm_before_gate=False, D_has_hdim=False)
    return _build(where, problems, d_model=d_model, vocab_size=vocab, layers=layers, norm_epsilon=eps,
                  tie_embeddings=tie, mamba2=mamba2, shared=shared)


def _first_uses(config: HybridConfig) -> tuple[dict[int, int], dict[int, int]]:
    """(shared block -> the first layer using it, layer -> its index among the layers using a shared block)."""
    first: dict[int, int] = {}
    order: dict[int, int] = {}
    for i, spec in enumerate(config.layers):
        if spec.get("shared") is not None:
            first.setdefault(spec["shared"], i)
            order[i] = len(order)
    return first, order


_BLOCK_PARTS = {"norm.": "input_layernorm.", "norm2.": "pre_ff_layernorm.", "attn.out_proj.": "self_attn.o_proj.",
                "attn.": "self_attn.", "mlp.": "feed_forward."}


def _block_key(rest: str) -> str:
    for ours, theirs in _BLOCK_PARTS.items():
        if rest.startswith(ours):
            return theirs + rest[len(ours):]
    return rest


def _use_key(i: int, rest: str, config: HybridConfig) -> str:
    """A SharedUse tensor (linear.weight, adapters.{q,k,v,gate_up}.{0,1}.weight) of layer i."""
    if rest == "linear.weight":
        return f"model.layers.{i}.linear.weight"
    first, order = _first_uses(config)
    name, _, tail = rest[len("adapters."):].partition(".")
    base = f"model.layers.{first[config.layers[i]['shared']]}.shared_transformer"
    if name == "gate_up":
        return f"{base}.feed_forward.gate_up_proj_adapter_list.{order[i]}.{tail}"
    return f"{base}.self_attn.linear_{name}_adapter_list.{order[i]}.{tail}"


def zamba2_key(key: str, config: HybridConfig) -> str:
    """The transformers name of a mambakit key of a Zamba2 model."""
    if key.startswith("backbone.shared_blocks."):
        b, _, rest = key[len("backbone.shared_blocks."):].partition(".")
        first, _ = _first_uses(config)
        return f"model.layers.{first[int(b)]}.shared_transformer.{_block_key(rest)}"
    parts: Union[str, tuple[int, str, str]] = key_parts(key, HF_TOP_KEYS)
    if isinstance(parts, str):
        prefix, _, rest = key.partition(".shared.")
        if prefix.startswith("backbone.layers.") and rest:
            return _use_key(int(prefix.rsplit(".", 1)[1]), rest, config)
        return parts
    i, part, rest = parts
    where = f"model.layers.{i}" + (".mamba_decoder" if config.layers[i].get("shared") is not None else "")
    return f"{where}.{'input_layernorm' if part == 'norm' else 'mamba'}.{rest}"


def _mamba_fields(model: HybridLM, problems: list[str]) -> dict[str, Any]:
    m = model.backbone.layers[0].mixer
    eps_ok = m.rmsnorm and m.norm.eps == _MIXER_NORM_EPS and not m.norm.norm_before_gate
    if m.D_has_hdim or not eps_ok:
        problems.append(f"Zamba2's Mamba-2 mixers have D per head and the gated norm norm(y * silu(z)) with epsilon "
                        f"{_MIXER_NORM_EPS}")
    if m.conv1d.bias is None:
        problems.append("Zamba2's Mamba-2 convs always have a bias")
    if m.dt_limit[1] != math.inf:
        problems.append(f"dt_limit {m.dt_limit} has no Zamba2 equivalent ([time_step_min, inf))")
    if m.headdim * m.nheads != m.expand * model.config.d_model:
        problems.append("Zamba2's Mamba-2 width is mamba_expand * hidden_size")
    return dict(n_mamba_heads=m.nheads, mamba_ngroups=m.ngroups, mamba_d_state=m.d_state, mamba_d_conv=m.d_conv,
                mamba_expand=m.expand, chunk_size=m.chunk_size, use_conv_bias=True,
                time_step_min=float(m.dt_limit[0]))


def _shared_fields(model: HybridLM, bias: Optional[bool], problems: list[str]) -> dict[str, Any]:
    config: HybridConfig = model.config
    s = config.shared
    uses = [spec["shared"] for spec in config.layers if spec.get("shared") is not None]
    if not uses:
        return {}
    blocks = s.get("num_blocks", 0)
    if uses != [j % blocks for j in range(len(uses))]:
        problems.append(f"the j-th layer using a shared block must use block j % num_blocks ({blocks}), got {uses}")
    if not config.tie_embeddings:
        problems.append("transformers' Zamba2 shares its blocks only with tie_word_embeddings true; this model's "
                        "embeddings are untied")
    if not s.get("adapter_rank"):
        problems.append("Zamba2's shared blocks always have MLP adapters (adapter_rank > 0)")
    block = model.backbone.shared_blocks[0]
    if s.get("norm_epsilon", 1e-5) != config.norm_epsilon:
        problems.append("the shared blocks' norm epsilon must equal norm_epsilon (rms_norm_eps)")
    if bool(s.get("bias", False)) != bias:
        problems.append("the Mamba-2 projections and the shared MLPs must all have a bias or none (add_bias_linear)")
    if s.get("activation", "gelu") not in ACTIVATIONS:
        problems.append(f"shared MLP activation {s.get('activation')!r} has no Zamba2 equivalent")
    a = block.attn
    hf = dict(num_attention_heads=a.num_heads, num_key_value_heads=a.num_heads_kv, num_mem_blocks=blocks,
              intermediate_size=s.get("d_intermediate"), hidden_act=s.get("activation", "gelu"),
              adapter_rank=s.get("adapter_rank"), use_shared_attention_adapter=bool(s.get("attention_adapters")),
              use_mem_rope=bool(a.rotary_emb_dim))
    if a.rotary_emb_dim:
        hf["rope_parameters"] = dict(rope_type="default", rope_theta=float(a.rotary_emb_base))
    return hf


def zamba2_hf(model: HybridLM, problems: list[str]) -> dict[str, Any]:
    config: HybridConfig = model.config
    if any(s["mixer"] != "mamba2" or s["mlp"] is not None for s in config.layers):
        problems.append("every Zamba2 layer is a Mamba-2 mixer without an MLP (optionally using a shared block)")
        return {}
    for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if getattr(config, name) != 1.0:
            problems.append(f"{name}={getattr(config, name)} has no Zamba2 equivalent (1.0)")
    m = model.backbone.layers[0].mixer
    bias = m.in_proj.bias is not None
    if (m.out_proj.bias is not None) != bias:
        problems.append("in_proj and out_proj must both have a bias or both have none (add_bias_linear)")
    types = ["hybrid" if s.get("shared") is not None else "linear_attention" for s in config.layers]
    hf: dict[str, Any] = dict(vocab_size=config.vocab_size, hidden_size=config.d_model,
                              num_hidden_layers=config.n_layer,
                              layers_block_type=types, rms_norm_eps=config.norm_epsilon, add_bias_linear=bias,
                              tie_word_embeddings=bool(config.tie_embeddings), **_mamba_fields(model, problems))
    hf.update(_shared_fields(model, bias, problems))
    return hf
