"""transformers' Falcon-H1 (``falcon_h1``, `FalconH1ForCausalLM`) config and tensor names.

Every layer is h = h + ParallelMixer(RMSNorm(h)) (attention with RoPE over the whole head and a Mamba-2 mixer of
width mamba_d_ssm side by side, `mambakit.layers.parallel_mixer`), then h = h + MLP(RMSNorm(h)) (SwiGLU with
mlp_multipliers on the gate and the output). The embeddings are multiplied by embedding_multiplier and the logits by
lm_head_multiplier (read as logits_scaling = 1 / lm_head_multiplier). The Mamba-2 gated norm is optional
(mamba_rms_norm; else y * silu(z)), before or after the gate (mamba_norm_before_gate), per group, epsilon
rms_norm_eps; out_proj's bias is projectors_bias, in_proj's mamba_proj_bias.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from mambakit.models.hybrid import HybridConfig, HybridLM
from mambakit.models.io.bamba import _build, _heads
from mambakit.models.io.folder import is_int, is_number
from mambakit.models.io.hybrid_fields import HF_TOP_KEYS, ConfigReader, key_parts, read_rope

# FalconH1Config's defaults (transformers 5.x) for the fields that change the computation
_FALCON_H1_DEFAULTS: dict[str, Any] = dict(
    vocab_size=128000, tie_word_embeddings=False, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", rms_norm_eps=1e-5, mamba_d_ssm=1024,
    mamba_n_heads=128, mamba_d_head="auto", mamba_n_groups=1, mamba_d_state=256, mamba_d_conv=4, mamba_expand=2,
    mamba_chunk_size=256, mamba_conv_bias=True, mamba_proj_bias=False, mamba_norm_before_gate=True,
    mamba_rms_norm=False, time_step_limit=[0.0, float("inf")], projectors_bias=False, lm_head_multiplier=1.0,
    embedding_multiplier=1.0, mlp_multipliers=[1.0, 1.0], key_multiplier=1.0, attention_out_multiplier=1.0,
    attention_in_multiplier=1.0, ssm_multipliers=[1.0] * 5, ssm_in_multiplier=1.0, ssm_out_multiplier=1.0,
    attention_bias=False, mlp_bias=False)
_SCALARS = ("key_multiplier", "attention_in_multiplier", "attention_out_multiplier", "ssm_in_multiplier",
            "ssm_out_multiplier")


def _finite(v: Any) -> bool:
    return is_number(v) and math.isfinite(v)


def _numbers(r: ConfigReader, name: str, n: int) -> Optional[list[float]]:
    v = r.need(name, lambda v: isinstance(v, (list, tuple)) and len(v) == n and all(_finite(x) for x in v),
               f"a list of {n} finite numbers")
    return None if v is None else [float(x) for x in v]


def _mamba(r: ConfigReader, raw: dict[str, Any], d_model: Optional[int],
           eps: Optional[float]) -> tuple[dict[str, Any], Optional[int]]:
    """(the Mamba2 keyword arguments, d_ssm)."""
    cfg, problems = r.cfg, r.problems
    m_heads, m_groups = r.pos_int("mamba_n_heads"), r.pos_int("mamba_n_groups")
    expand = r.pos_int("mamba_expand")
    # absent: FalconH1Config's default; null: mamba_expand * hidden_size
    d_ssm = raw.get("mamba_d_ssm", _FALCON_H1_DEFAULTS["mamba_d_ssm"])
    if d_ssm is None and expand and d_model:
        d_ssm = expand * d_model
    if not (is_int(d_ssm) and d_ssm > 0):
        problems.append(f"mamba_d_ssm must be a positive integer or null, got {cfg.get('mamba_d_ssm')!r}")
        d_ssm = None
    d_head = cfg.get("mamba_d_head")
    if d_head == "auto" and d_ssm and m_heads:
        d_head = d_ssm // m_heads
    if not (is_int(d_head) and d_head > 0):
        problems.append(f"mamba_d_head must be a positive integer or 'auto', got {cfg.get('mamba_d_head')!r}")
    elif d_ssm and m_heads and d_head * m_heads != d_ssm:
        problems.append(f"mamba_n_heads * mamba_d_head = {m_heads} * {d_head} must equal the Mamba width "
                        f"mamba_d_ssm = {d_ssm}")
    elif m_heads and m_groups and m_heads % m_groups:
        problems.append(f"mamba_n_heads {m_heads} must be divisible by mamba_n_groups {m_groups}")
    if cfg.get("hidden_act") != "silu":
        problems.append(f"hidden_act {cfg.get('hidden_act')!r} is not supported (Falcon-H1's conv and MLPs use it; "
                        "mambakit's Mamba-2 conv uses 'silu')")
    kwargs = dict(d_state=r.pos_int("mamba_d_state"), d_conv=r.pos_int("mamba_d_conv"), headdim=d_head,
                  ngroups=m_groups, chunk_size=r.pos_int("mamba_chunk_size"), dt_limit=r.dt_limit(),
                  bias=r.flag("mamba_proj_bias"), conv_bias=r.flag("mamba_conv_bias"), norm_eps=eps,
                  rmsnorm=r.flag("mamba_rms_norm"), norm_before_gate=r.flag("mamba_norm_before_gate"),
                  D_has_hdim=False)
    return kwargs, d_ssm


def falcon_h1_config(raw: dict[str, Any], where: str) -> HybridConfig:
    r = ConfigReader(raw, _FALCON_H1_DEFAULTS)
    d_model, n_layer, vocab = r.pos_int("hidden_size"), r.pos_int("num_hidden_layers"), r.pos_int("vocab_size")
    d_ff, eps, tie = r.pos_int("intermediate_size"), r.pos_num("rms_norm_eps"), r.flag("tie_word_embeddings")
    heads, kv_heads, head_dim = _heads(r, d_model)
    attn_bias, mlp_bias = r.flag("attention_bias"), r.flag("mlp_bias")
    mamba2, d_ssm = _mamba(r, raw, d_model, eps)
    _, theta = read_rope(r, head_dim, 1.0)  # FalconH1RotaryEmbedding rotates the whole head
    scalars = {name: r.need(name, _finite, "a finite number") for name in _SCALARS}
    emb, lm_head = r.pos_num("embedding_multiplier"), r.pos_num("lm_head_multiplier")
    parallel = dict(d_ssm=d_ssm, ssm_multipliers=_numbers(r, "ssm_multipliers", 5),
                    out_proj_bias=r.flag("projectors_bias"), **scalars)
    layers = [{"mixer": "parallel", "mlp": "gated"} for _ in range(n_layer or 0)]
    return _build(where, r.problems, d_model=d_model, vocab_size=vocab, layers=layers, norm_epsilon=eps,
                  tie_embeddings=tie, mamba2=mamba2, parallel=parallel,
                  attention=dict(num_heads=heads, num_heads_kv=kv_heads, head_dim=head_dim, rotary_emb_dim=head_dim,
                                 rotary_emb_base=theta, qkv_proj_bias=attn_bias, out_proj_bias=attn_bias,
                                 separate_qkv=True),
                  mlp=dict(d_intermediate=d_ff, activation="silu", bias=mlp_bias,
                           multipliers=_numbers(r, "mlp_multipliers", 2)),
                  embedding_multiplier=emb, logits_scaling=None if lm_head is None else 1.0 / lm_head)


def falcon_h1_key(key: str, config: HybridConfig) -> str:
    """The transformers name of a mambakit key of a Falcon-H1 model."""
    parts = key_parts(key, HF_TOP_KEYS)
    if isinstance(parts, str):
        return parts
    i, part, rest = parts
    if part == "mixer":
        if rest.startswith("attn.out_proj."):
            rest = "self_attn.o_proj." + rest[len("attn.out_proj."):]
        elif rest.startswith("attn."):
            rest = "self_attn." + rest[len("attn."):]
        return f"model.layers.{i}.{rest}"
    part = {"norm": "input_layernorm", "norm2": "pre_ff_layernorm", "mlp": "feed_forward"}[part]
    return f"model.layers.{i}.{part}.{rest}"


def _mixer_fields(mixer: Any, eps: float, problems: list[str]) -> dict[str, Any]:
    m, a = mixer.mamba, mixer.attn
    if m.D_has_hdim:
        problems.append("Falcon-H1's Mamba-2 mixers have D per head")
    if m.rmsnorm and m.norm.eps != eps:
        problems.append(f"the gated norm's epsilon {m.norm.eps} differs from norm_epsilon {eps}; Falcon-H1 uses "
                        "rms_norm_eps for both")
    if a.rotary_emb_dim != a.head_dim or a.softmax_scale is not None:
        problems.append("Falcon-H1's attention has RoPE over the whole head and the softmax scale head_dim ** -0.5")
    bias = a.q_proj.bias is not None
    if (a.out_proj.bias is not None) != bias:
        problems.append("the q/k/v and output projections must all have a bias or none (attention_bias)")
    mult = mixer.multipliers
    return dict(
        mamba_d_ssm=m.d_ssm, mamba_n_heads=m.nheads, mamba_d_head=m.headdim, mamba_n_groups=m.ngroups,
        mamba_d_state=m.d_state, mamba_d_conv=m.d_conv, mamba_chunk_size=m.chunk_size,
        mamba_conv_bias=m.conv1d.bias is not None, mamba_proj_bias=m.in_proj.bias is not None,
        projectors_bias=m.out_proj.bias is not None, mamba_rms_norm=bool(m.rmsnorm),
        mamba_norm_before_gate=bool(m.norm.norm_before_gate) if m.rmsnorm else True,
        time_step_limit=[float(m.dt_limit[0]), float(m.dt_limit[1])], ssm_multipliers=list(m.ssm_multipliers),
        num_attention_heads=a.num_heads, num_key_value_heads=a.num_heads_kv, head_dim=a.head_dim,
        attention_bias=bias, rope_parameters=dict(rope_type="default", rope_theta=float(a.rotary_emb_base)),
        key_multiplier=mixer.key_multiplier, attention_in_multiplier=mult["attention_in"],
        attention_out_multiplier=mult["attention_out"], ssm_in_multiplier=mult["ssm_in"],
        ssm_out_multiplier=mult["ssm_out"])


def falcon_h1_hf(model: HybridLM, problems: list[str]) -> dict[str, Any]:
    config: HybridConfig = model.config
    if any(s != {"mixer": "parallel", "mlp": "gated"} for s in config.layers):
        problems.append("every Falcon-H1 layer is a parallel attention + Mamba-2 mixer followed by a gated MLP")
        return {}
    if config.residual_multiplier != 1.0:
        problems.append(f"residual_multiplier={config.residual_multiplier} has no Falcon-H1 equivalent (1.0)")
    mlp = config.mlp
    if mlp.get("activation", "silu") != "silu" or mlp.get("packed"):
        problems.append("Falcon-H1's MLPs are SwiGLU ('silu') with separate gate_proj / up_proj")
    mixers = [layer.mixer for layer in model.backbone.layers]
    fields = [_mixer_fields(m, config.norm_epsilon, problems) for m in mixers]
    if any(f != fields[0] for f in fields):
        problems.append("every Falcon-H1 layer has the same mixer configuration")
    hf: dict[str, Any] = dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layer,
        rms_norm_eps=config.norm_epsilon, tie_word_embeddings=bool(config.tie_embeddings), hidden_act="silu",
        intermediate_size=mlp.get("d_intermediate"), mlp_bias=bool(mlp.get("bias", False)),
        mlp_multipliers=[float(x) for x in mlp.get("multipliers") or (1.0, 1.0)],
        embedding_multiplier=float(config.embedding_multiplier), lm_head_multiplier=1.0 / config.logits_scaling,
        **fields[0])
    return hf
