"""The Mamba-2 hybrids of `transformers` as `HybridLM` models: reading their config.json, their tensor names, and
writing them back (``save_pretrained(model, path, format="hf")``).

Supported: ``bamba`` (`BambaForCausalLM`: Mamba-2 mixers, grouped-query attention with partial RoPE at
``attn_layer_indices``, a SwiGLU MLP after every mixer) and ``nemotron_h`` (`NemotronHForCausalLM`: each layer ONE
of a Mamba-2 mixer, attention without positional encoding, or a plain MLP, from ``layers_block_type`` or the legacy
``hybrid_override_pattern``; MoE layers and multi-token-prediction heads are refused). Every value mambakit would not compute exactly is refused,
all of them in one CheckpointError.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mambakit.errors import CheckpointError, MambaKitError
from mambakit.models.hybrid import HybridConfig, HybridLM
from mambakit.models.io.folder import is_int, is_number, json_float, write_json
from mambakit.models.io.names import CONFIG_NAME, SAFETENSORS_NAME
from mambakit.models.io.transformers import hf_state
from mambakit.models.io.weights import write_safetensors

HYBRID_MODEL_TYPES = ("bamba", "nemotron_h")
HYBRID_ARCHITECTURES = {"bamba": "BambaForCausalLM", "nemotron_h": "NemotronHForCausalLM"}
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")

# BambaConfig's defaults (transformers 5.x) for the fields that change the computation
_BAMBA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=128000, tie_word_embeddings=False, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", rms_norm_eps=1e-5, attn_layer_indices=None,
    mamba_n_heads=128, mamba_d_head="auto", mamba_n_groups=1, mamba_d_state=256, mamba_d_conv=4, mamba_expand=2,
    mamba_chunk_size=256, mamba_conv_bias=True, mamba_proj_bias=False, time_step_limit=[0.0, float("inf")],
    attention_bias=False, mlp_bias=False)
_BAMBA_PARTIAL_ROTARY = 0.5  # what BambaConfig sets when rope_parameters does not say
_ROPE_THETA = 10000.0

_LAYER_KEY = re.compile(r"^backbone\.layers\.(\d+)\.(norm|mixer|norm2|mlp)\.(.+)$")


class _Reader:
    """The config values with transformers' defaults filled in, and the problems found while reading them."""

    def __init__(self, raw: dict[str, Any], defaults: dict[str, Any]):
        self.cfg = dict(defaults)
        self.cfg.update({k: v for k, v in raw.items() if v is not None or k not in defaults})
        self.problems: list[str] = []

    def need(self, name: str, test: Callable[[Any], bool], what: str) -> Any:
        v = self.cfg.get(name)
        if not test(v):
            self.problems.append(f"{name} must be {what}, got {v!r}")
            return None
        return v

    def pos_int(self, name: str) -> Optional[int]:
        return self.need(name, lambda v: is_int(v) and v > 0, "a positive integer")

    def flag(self, name: str) -> Optional[bool]:
        return self.need(name, lambda v: isinstance(v, bool), "true or false")

    def pos_num(self, name: str) -> Optional[float]:
        v = self.need(name, lambda v: is_number(v) and math.isfinite(v) and v > 0, "a positive number")
        return None if v is None else float(v)

    def dt_limit(self, name: str = "time_step_limit") -> Optional[tuple[float, float]]:
        limit = self.cfg.get(name)
        try:
            if not isinstance(limit, (list, tuple)) or len(limit) != 2:
                raise ValueError("expected a list of two numbers")
            lo, hi = json_float(limit[0]), json_float(limit[1])
            if math.isnan(lo) or math.isnan(hi) or not 0.0 <= lo < hi:
                raise ValueError("expected 0 <= low < high")
            return lo, hi
        except ValueError as exc:
            self.problems.append(f"{name} must be [low, high] with 0 <= low < high (high may be Infinity), got "
                                 f"{limit!r} ({exc})")
            return None


def _rope(r: _Reader, head_dim: Optional[int], default_factor: float) -> tuple[Optional[int], float]:
    """(rotary_emb_dim, rope_theta) from rope_parameters (or the legacy top-level rope_theta)."""
    rp = r.cfg.get("rope_parameters") or {}
    if not isinstance(rp, dict):
        r.problems.append(f"rope_parameters must be a JSON object, got {rp!r}")
        return None, _ROPE_THETA
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type != "default":
        r.problems.append(f"rope_parameters.rope_type {rope_type!r} is not supported (only 'default' RoPE)")
    if r.cfg.get("rope_scaling") not in (None, {}):
        r.problems.append(f"rope_scaling {r.cfg['rope_scaling']!r} is not supported (only plain RoPE)")
    theta = rp.get("rope_theta", r.cfg.get("rope_theta", _ROPE_THETA))
    factor = rp.get("partial_rotary_factor", r.cfg.get("partial_rotary_factor", default_factor))
    if not (is_number(theta) and theta > 0):
        r.problems.append(f"rope_theta must be a positive number, got {theta!r}")
        theta = _ROPE_THETA
    if not (is_number(factor) and 0 < factor <= 1):
        r.problems.append(f"partial_rotary_factor must be a number in (0, 1], got {factor!r}")
        return None, float(theta)
    if head_dim is None:
        return None, float(theta)
    rotary = int(head_dim * factor)
    if rotary % 2:
        r.problems.append(f"the rotary dimension int(head_dim * partial_rotary_factor) = int({head_dim} * {factor}) "
                          f"= {rotary} must be even")
    return rotary, float(theta)


def _bamba_config(raw: dict[str, Any], where: str) -> HybridConfig:
    r = _Reader(raw, _BAMBA_DEFAULTS)
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
    rotary, theta = _rope(r, head_dim, _BAMBA_PARTIAL_ROTARY)
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


# NemotronHConfig's defaults (transformers 5.x) for the fields that change the computation
_NEMOTRON_DEFAULTS: dict[str, Any] = dict(
    vocab_size=131072, hidden_size=4096, tie_word_embeddings=False, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, sliding_window=None, intermediate_size=21504, mlp_hidden_act="relu2", mlp_bias=False,
    ssm_state_size=128, mamba_num_heads=128, mamba_head_dim=64, mamba_hidden_act="silu", n_groups=8, conv_kernel=4,
    time_step_min=0.001, use_conv_bias=True, chunk_size=128, num_nextn_predict_layers=0, use_bias=False,
    layer_norm_epsilon=1e-5)
# the older field names NemotronHConfig still reads (they win over the new ones, as there)
_NEMOTRON_LEGACY = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_dt_min": "time_step_min",
                    "mamba_conv_bias": "use_conv_bias", "mamba_chunk_size": "chunk_size"}
_NEMOTRON_PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_NEMOTRON_LAYERS = {"linear_attention": {"mixer": "mamba2", "mlp": None},
                    "full_attention": {"mixer": "attention", "mlp": None}, "mlp": {"mixer": None, "mlp": "plain"}}
_MLP_ACTS = ("relu2", "relu", "silu", "gelu")


def _nemotron_layer_types(r: _Reader) -> list[str]:
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
    moe = [i for i, t in enumerate(types) if t == "moe"]
    if moe:
        r.problems.append(f"MoE layers (layers {moe}) are not supported yet")
    unknown = sorted({str(t) for t in types if t not in _NEMOTRON_LAYERS and t != "moe"})
    if unknown:
        r.problems.append(f"layers_block_type holds unknown layer types {unknown} (known: "
                          f"{[*_NEMOTRON_LAYERS, 'moe']})")
    return types if not (moe or unknown) else []


def _nemotron_config(raw: dict[str, Any], where: str) -> HybridConfig:
    raw = dict(raw)
    for old, new in _NEMOTRON_LEGACY.items():
        if raw.get(old) is not None:
            raw[new] = raw[old]
    r = _Reader(raw, _NEMOTRON_DEFAULTS)
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
    r.flag("tie_word_embeddings")  # checked, but NemotronHForCausalLM ties nothing: lm_head is always its own tensor
    mlp_bias, bias, conv_bias = r.flag("mlp_bias"), r.flag("use_bias"), r.flag("use_conv_bias")
    d_state, m_heads, d_head = r.pos_int("ssm_state_size"), r.pos_int("mamba_num_heads"), r.pos_int("mamba_head_dim")
    m_groups, d_conv, chunk = r.pos_int("n_groups"), r.pos_int("conv_kernel"), r.pos_int("chunk_size")
    dt_min = r.need("time_step_min", lambda v: is_number(v) and 0 <= v < math.inf, "a number >= 0")
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
            # transformers clamps dt to [time_step_min, inf) and ignores time_step_limit here
            mamba2=dict(d_state=d_state, d_conv=d_conv, expand=expand, headdim=d_head, ngroups=m_groups,
                        chunk_size=chunk, dt_limit=(float(dt_min), math.inf), bias=bias, conv_bias=conv_bias,
                        norm_eps=eps, rmsnorm=True, norm_before_gate=False, D_has_hdim=False),
            # NemotronHAttention has no biases whatever attention_bias says, and no positional encoding
            attention=dict(num_heads=heads, num_heads_kv=kv_heads, head_dim=head_dim, rotary_emb_dim=0,
                           qkv_proj_bias=False, out_proj_bias=False, separate_qkv=True),
            mlp=dict(d_intermediate=d_ff, activation=act, bias=mlp_bias))
    except MambaKitError as exc:
        raise CheckpointError(f"unsupported {where}: {exc}") from exc


def config_from_hybrid_hf(raw: dict[str, Any], where: str = CONFIG_NAME) -> HybridConfig:
    """The HybridConfig that computes what transformers computes for this config.json (model_type in
    HYBRID_MODEL_TYPES); CheckpointError listing every unsupported or invalid value."""
    mt = raw.get("model_type")
    if mt == "bamba":
        return _bamba_config(raw, where)
    if mt == "nemotron_h":
        return _nemotron_config(raw, where)
    raise CheckpointError(f"{where}: model_type must be one of {list(HYBRID_MODEL_TYPES)}, got {mt!r}")


# ----------------------------------------------------------------------------------------------------------------------
# tensor names
def _bamba_key(key: str, config: HybridConfig) -> str:
    """The transformers name of a mambakit key of a Bamba model."""
    top = {"backbone.embedding.weight": "model.embed_tokens.weight",
           "backbone.norm_f.weight": "model.final_layernorm.weight"}
    if key in top:
        return top[key]
    m = _LAYER_KEY.match(key)
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


def _nemotron_key(key: str, config: HybridConfig) -> str:
    """The transformers name of a mambakit key of a Nemotron-H model (each layer holds one part: norm + mixer; files
    name the base model ``backbone``, as NVIDIA's originals do)."""
    top = {"backbone.embedding.weight": "backbone.embeddings.weight"}
    if key in top:
        return top[key]
    m = _LAYER_KEY.match(key)
    if m is None:
        return key
    i, part, rest = int(m.group(1)), m.group(2), m.group(3)
    if part == "mixer" and config.layers[i]["mixer"] == "attention" and rest.startswith("out_proj."):
        rest = "o_proj." + rest[len("out_proj."):]
    return f"backbone.layers.{i}.{'norm' if part in ('norm', 'norm2') else 'mixer'}.{rest}"


_KEY_RULES = {"bamba": _bamba_key, "nemotron_h": _nemotron_key}
# other prefixes a file may use for the base model (transformers reads both)
_FILE_PREFIXES = {"nemotron_h": ("model.", "backbone.")}


def hybrid_key_map(config: HybridConfig, model_type: str) -> dict[str, str]:
    """mambakit key -> transformers key for every tensor of a HybridLM of `config`, lm_head included."""
    with torch.device("meta"):
        keys = list(HybridLM(config, device="meta").state_dict())
    rule = _KEY_RULES[model_type]
    return {k: rule(k, config) for k in keys}


def hybrid_names(config: HybridConfig, model_type: str) -> tuple[Callable[[list[str]], dict[str, str]],
                                                                  Callable[[str], str]]:
    """(rename, to_file) for `load_model`: file keys -> mambakit keys (unknown ones kept as they are, to be reported
    as unexpected), and a mambakit key -> its name in the file."""
    ours_to_file = hybrid_key_map(config, model_type)
    file_to_ours = {v: k for k, v in ours_to_file.items()}
    alias, canonical = _FILE_PREFIXES.get(model_type, ("", ""))

    def ours(key: str) -> str:
        if alias and key.startswith(alias):
            key = canonical + key[len(alias):]
        return file_to_ours.get(key, key)

    return (lambda keys: {k: ours(k) for k in keys}), (lambda k: ours_to_file.get(k, k))


# ----------------------------------------------------------------------------------------------------------------------
# saving
def _uniform(model: HybridLM, kind: str) -> list[torch.nn.Module]:
    return [layer.mixer for layer in model.backbone.layers if layer.mixer is not None and
            type(layer.mixer).__name__ == kind]


def _bamba_hf(model: HybridLM, problems: list[str]) -> dict[str, Any]:
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
    mambas, attns = _uniform(model, "Mamba2"), _uniform(model, "MHA")
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


def _nemotron_hf(model: HybridLM, problems: list[str]) -> dict[str, Any]:
    config: HybridConfig = model.config
    kinds = {"mamba2": "linear_attention", "attention": "full_attention", "plain": "mlp"}
    types = []
    for i, spec in enumerate(config.layers):
        parts = [p for p in (spec["mixer"], spec["mlp"]) if p is not None]
        if len(parts) != 1 or parts[0] not in kinds:
            problems.append(f"layer {i} ({spec}) must be exactly one of a Mamba-2 mixer, attention or a plain MLP")
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
    mambas, attns = _uniform(model, "Mamba2"), _uniform(model, "MHA")
    if mambas:
        m = mambas[0]
        if m.D_has_hdim or not m.rmsnorm or m.norm.norm_before_gate or m.norm.eps != config.norm_epsilon:
            problems.append("Nemotron-H's Mamba-2 mixers have D per head and norm(y * silu(z)) with the block "
                            "norms' epsilon")
        if m.dt_limit[1] != math.inf:
            problems.append(f"dt_limit {m.dt_limit} has no Nemotron-H equivalent ([time_step_min, inf))")
        if (m.in_proj.bias is None) != (m.out_proj.bias is None):
            problems.append("in_proj and out_proj must both have a bias or both have none (use_bias)")
        hf.update(mamba_num_heads=m.nheads, mamba_head_dim=m.headdim, n_groups=m.ngroups, ssm_state_size=m.d_state,
                  conv_kernel=m.d_conv, expand=m.expand, chunk_size=m.chunk_size,
                  use_conv_bias=m.conv1d.bias is not None, use_bias=m.in_proj.bias is not None,
                  time_step_min=float(m.dt_limit[0]))
    if attns:
        a = attns[0]
        if not a.separate_qkv or a.q_proj.bias is not None or a.out_proj.bias is not None:
            problems.append("Nemotron-H attention has separate q/k/v projections without biases")
        if a.rotary_emb_dim or a.softmax_scale is not None:
            problems.append("Nemotron-H attention has no positional encoding and the softmax scale head_dim ** -0.5")
        hf.update(num_attention_heads=a.num_heads, num_key_value_heads=a.num_heads_kv, head_dim=a.head_dim,
                  attention_bias=False)
    return hf


_WRITERS = {"bamba": _bamba_hf, "nemotron_h": _nemotron_hf}


def hybrid_config_to_hf(model: HybridLM, model_type: str = "bamba",
                        extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The transformers config.json of `model` as `model_type`; CheckpointError listing every reason it cannot be."""
    if model_type not in _WRITERS:
        raise CheckpointError(f"cannot save a hybrid model as transformers model_type {model_type!r}; supported: "
                              f"{list(_WRITERS)}")
    problems: list[str] = []
    hf = _WRITERS[model_type](model, problems)
    if problems:
        raise CheckpointError.listing(f"cannot save this model in transformers format ({model_type})", problems)
    hf.update(architectures=[HYBRID_ARCHITECTURES[model_type]], model_type=model_type,
              dtype=str(model.backbone.embedding.weight.dtype).replace("torch.", ""))
    for key in _TOKEN_ID_FIELDS:
        if extra and key in extra:
            hf[key] = extra[key]
    return dict(sorted(hf.items()))


def hybrid_writer(model: HybridLM) -> Callable[[Path], None]:
    """What writes `model` in transformers format into a folder (as the model_type it was loaded from, else bamba
    when every layer has a mixer and an MLP, else nemotron_h);
    every reason it cannot is raised here, before any file is written."""
    source = getattr(model, "pretrained_source", None) or {}
    extra = source.get("config") if source.get("format") == "hf" else None
    default = "bamba" if all(s["mixer"] and s["mlp"] for s in model.config.layers) else "nemotron_h"
    model_type = (extra or {}).get("model_type", default)
    hf_config = hybrid_config_to_hf(model, model_type, extra)
    state = hf_state(model, hybrid_key_map(model.config, model_type).__getitem__)

    def write(tmp: Path) -> None:
        write_json(tmp / CONFIG_NAME, hf_config)
        write_safetensors(state, tmp / SAFETENSORS_NAME)

    return write
