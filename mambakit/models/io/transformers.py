"""The Hugging Face `transformers` format: Mamba / Mamba-2 / Falcon-Mamba folders (config.json with ``model_type``
"mamba", "mamba2" or "falcon_mamba", the last a Mamba-1 whose mixers apply a weightless RMSNorm to dt, B and C,
``bcdt_rms`` in ssm_cfg; weights in model.safetensors, sharded safetensors, pytorch_model.bin or sharded .bin).

transformers names the embedding ``backbone.embeddings.weight`` (mambakit and mamba_ssm: ``backbone.embedding.weight``)
and omits ``lm_head.weight`` when the embeddings are tied. It does not pad the vocabulary, so such a model is built
with ``pad_vocab_size_multiple=1``: its logits have exactly the checkpoint's ``vocab_size`` columns, and a model saved
in this format is written with its unpadded vocabulary.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mambakit.errors import CheckpointError, MambaKitError
from mambakit.models.config import MambaConfig
from mambakit.models.io.folder import is_int, is_number, json_float, write_json
from mambakit.models.io.names import (CONFIG_NAME, EMBEDDING_KEY, HF_EMBEDDING_KEY, LM_HEAD_KEY, RUNTIME_SSM_KEYS,
                                      SAFETENSORS_NAME)
from mambakit.models.io.state import check_tie, cpu_state
from mambakit.models.io.weights import write_safetensors

HF_MODEL_TYPES = ("mamba", "mamba2", "falcon_mamba")
HF_ARCHITECTURES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM",
                    "falcon_mamba": "FalconMambaForCausalLM"}
# Other model types of the family that transformers knows; their computation differs, so they are refused by name.
HF_RELATED_TYPES = ("zamba", "zamba2",
                    "falcon_h1", "mamba2_hybrid")

# transformers' defaults for fields a config.json may leave out (MambaConfig / Mamba2Config of transformers 5.x;
# the same values in 4.x). An absent field means these values to transformers, so it means them to us too.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mamba": dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=32, layer_norm_epsilon=1e-5,
                  expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True, hidden_act="silu",
                  residual_in_fp32=True, time_step_rank="auto", time_step_scale=1.0, time_step_min=0.001,
                  time_step_max=0.1, time_step_init_scheme="random", time_step_floor=1e-4,
                  tie_word_embeddings=True),
    "mamba2": dict(num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096, state_size=128,
                   num_hidden_layers=64, layer_norm_epsilon=1e-5, expand=2, conv_kernel=4, n_groups=8,
                   use_bias=False, use_conv_bias=True, hidden_act="silu", residual_in_fp32=True,
                   time_step_min=0.001, time_step_max=0.1, time_step_floor=1e-4,
                   time_step_limit=[0.0, float("inf")], chunk_size=256, tie_word_embeddings=False),
}
# FalconMambaConfig: MambaConfig's defaults plus the mixer norms' epsilon
_HF_DEFAULTS["falcon_mamba"] = dict(_HF_DEFAULTS["mamba"], mixer_rms_eps=1e-6)
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def config_from_hf(raw: dict[str, Any], where: str = CONFIG_NAME) -> MambaConfig:
    """The MambaConfig that computes what transformers computes for this config.json. All unsupported or invalid
    values are reported together in one CheckpointError."""
    mt = raw.get("model_type")
    if mt not in HF_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type must be one of {list(HF_MODEL_TYPES)}, got {mt!r}")
    cfg = dict(_HF_DEFAULTS[mt])
    cfg.update({k: v for k, v in raw.items() if v is not None or k not in cfg})
    problems: list[str] = []

    def need(name: str, test: Callable[[Any], bool], what: str) -> Any:
        v = cfg.get(name)
        if not test(v):
            problems.append(f"{name} must be {what}, got {v!r}")
            return None
        return v

    pos_int = lambda v: is_int(v) and v > 0  # noqa: E731
    integral = lambda v: is_number(v) and float(v) == int(v) and v > 0  # noqa: E731
    is_bool = lambda v: isinstance(v, bool)  # noqa: E731
    pos_num = lambda v: is_number(v) and v > 0  # noqa: E731

    d_model = need("hidden_size", pos_int, "a positive integer")
    n_layer = need("num_hidden_layers", pos_int, "a positive integer")
    vocab = need("vocab_size", pos_int, "a positive integer")
    d_state = need("state_size", pos_int, "a positive integer")
    d_conv = need("conv_kernel", pos_int, "a positive integer")
    expand = need("expand", integral, "a positive integer")
    eps = need("layer_norm_epsilon", pos_num, "a positive number")
    bias = need("use_bias", is_bool, "true or false")
    conv_bias = need("use_conv_bias", is_bool, "true or false")
    residual_in_fp32 = need("residual_in_fp32", is_bool, "true or false")
    tie = need("tie_word_embeddings", is_bool, "true or false")
    if cfg.get("hidden_act") != "silu":
        problems.append(f"hidden_act {cfg.get('hidden_act')!r} is not supported (Mamba blocks use 'silu')")
    if cfg.get("rms_norm", True) is not True:
        problems.append(f"rms_norm={cfg.get('rms_norm')!r} is not supported: the Mamba blocks of transformers always "
                        "use RMSNorm (it ignores this field), so the checkpoint's intent is unclear")
    if expand is not None:
        expand = int(expand)
    init = {}  # initialisation-only settings, kept so that a round trip preserves them
    for ours, theirs in (("dt_min", "time_step_min"), ("dt_max", "time_step_max"),
                         ("dt_init_floor", "time_step_floor")):
        if pos_num(cfg.get(theirs)):
            init[ours] = float(cfg[theirs])
    if "dt_min" in init and "dt_max" in init and init["dt_min"] > init["dt_max"]:
        init.pop("dt_min"), init.pop("dt_max")

    if mt in ("mamba", "falcon_mamba"):
        if mt == "falcon_mamba":
            init["bcdt_rms"] = True
            init["bcdt_rms_eps"] = need("mixer_rms_eps", pos_num, "a positive number")
        rank = cfg.get("time_step_rank")
        if rank == "auto" and d_model is not None:
            rank = math.ceil(d_model / 16)
        if not pos_int(rank):
            problems.append(f"time_step_rank must be a positive integer or 'auto', got {cfg.get('time_step_rank')!r}")
        inter = cfg.get("intermediate_size")
        if inter is not None and d_model is not None and expand is not None and inter != expand * d_model:
            problems.append(f"intermediate_size {inter!r} differs from expand * hidden_size = {expand * d_model}")
        if pos_num(cfg.get("time_step_scale")):
            init["dt_scale"] = float(cfg["time_step_scale"])
        if cfg.get("time_step_init_scheme") in ("random", "constant"):
            init["dt_init"] = cfg["time_step_init_scheme"]
        ssm_cfg = dict(layer="Mamba1", d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=rank,
                       conv_bias=conv_bias, bias=bias, **init)
    else:
        n_groups = need("n_groups", pos_int, "a positive integer")
        head_dim = need("head_dim", pos_int, "a positive integer")
        num_heads = need("num_heads", pos_int, "a positive integer")
        chunk_size = need("chunk_size", pos_int, "a positive integer")
        if None not in (d_model, expand, num_heads, head_dim) and d_model * expand != num_heads * head_dim:
            problems.append(f"hidden_size * expand = {d_model} * {expand} = {d_model * expand} must equal "
                            f"num_heads * head_dim = {num_heads} * {head_dim} = {num_heads * head_dim}")
        elif None not in (num_heads, n_groups) and num_heads % n_groups != 0:
            problems.append(f"num_heads {num_heads} must be divisible by n_groups {n_groups}")
        if cfg.get("norm_before_gate", False) is not False:
            problems.append(f"norm_before_gate={cfg.get('norm_before_gate')!r} is not supported: transformers always "
                            "computes norm(y * silu(z)) (it ignores this field), so the checkpoint's intent is unclear")
        limit = cfg.get("time_step_limit")
        dt_limit = None
        try:
            if not isinstance(limit, (list, tuple)) or len(limit) != 2:
                raise ValueError("expected a list of two numbers")
            dt_limit = (json_float(limit[0]), json_float(limit[1]))
            if any(math.isnan(x) for x in dt_limit) or not 0.0 <= dt_limit[0] < dt_limit[1]:
                raise ValueError("expected 0 <= low < high")
        except ValueError as exc:
            problems.append(f"time_step_limit must be [low, high] with 0 <= low < high (high may be Infinity), got "
                            f"{limit!r} ({exc})")
        ssm_cfg = dict(layer="Mamba2", d_state=d_state, d_conv=d_conv, expand=expand, headdim=head_dim,
                       ngroups=n_groups, chunk_size=chunk_size, dt_limit=dt_limit, bias=bias, conv_bias=conv_bias,
                       norm_eps=eps, rmsnorm=True, norm_before_gate=False, D_has_hdim=False, **init)
    if problems:
        raise CheckpointError.listing(f"unsupported {where}", problems)
    try:
        return MambaConfig(d_model=d_model, d_intermediate=0, n_layer=n_layer, vocab_size=vocab, ssm_cfg=ssm_cfg,
                           rms_norm=True, residual_in_fp32=residual_in_fp32, pad_vocab_size_multiple=1,
                           tie_embeddings=tie, norm_epsilon=float(eps))
    except MambaKitError as exc:
        raise CheckpointError(f"unsupported {where}: {exc}") from exc


def config_to_hf(model: torch.nn.Module, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The transformers config.json describing `model`; CheckpointError (listing every reason) when the model cannot
    be expressed as a transformers Mamba / Mamba-2 model."""
    config: MambaConfig = model.config
    problems: list[str] = []
    if config.d_intermediate:
        problems.append(f"d_intermediate={config.d_intermediate} (an MLP after each mixer) has no transformers "
                        "equivalent")
    if config.attn_layer_idx:
        problems.append(f"attention layers (attn_layer_idx={config.attn_layer_idx}) have no transformers Mamba "
                        "equivalent")
    if not config.rms_norm:
        problems.append("rms_norm=False has no transformers equivalent (always RMSNorm)")
    known = {"layer", *RUNTIME_SSM_KEYS}
    layer = config.mixer_layer
    if layer not in ("Mamba1", "Mamba2"):
        raise CheckpointError(f"cannot save this model in transformers format: its mixer {layer!r} is neither "
                              "Mamba1 nor Mamba2")
    ssm = config.ssm_cfg
    hf: dict[str, Any] = {}
    if layer == "Mamba1":
        known |= {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                  "dt_init_floor", "conv_bias", "bias", "bcdt_rms", "bcdt_rms_eps"}
    else:
        known |= {"d_state", "d_conv", "expand", "headdim", "ngroups", "A_init_range", "D_has_hdim", "rmsnorm",
                  "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit", "bias", "conv_bias",
                  "chunk_size", "norm_eps"}
    unknown = sorted(set(ssm) - known)
    if unknown:
        problems.append(f"ssm_cfg entries {unknown} have no transformers equivalent")
    mixers = [layer_.mixer for i, layer_ in enumerate(model.backbone.layers) if i not in config.attn_layer_idx]
    m = mixers[0] if mixers else None
    if m is not None:
        expand = m.expand
        if not (is_number(expand) and float(expand) == int(expand)):
            problems.append(f"expand={expand!r} must be an integer for transformers")
        expand = int(expand)
        common = dict(vocab_size=config.vocab_size, hidden_size=config.d_model, state_size=m.d_state,
                      num_hidden_layers=config.n_layer, layer_norm_epsilon=config.norm_epsilon, expand=expand,
                      conv_kernel=m.d_conv, use_bias=m.in_proj.bias is not None,
                      use_conv_bias=m.conv1d.bias is not None, hidden_act="silu", initializer_range=0.1,
                      residual_in_fp32=config.residual_in_fp32, rescale_prenorm_residual=False, use_cache=True,
                      tie_word_embeddings=bool(config.tie_embeddings))
        if (m.in_proj.bias is None) != (m.out_proj.bias is None):
            problems.append("in_proj and out_proj must both have a bias or both have none (transformers' use_bias)")
        if layer == "Mamba1":
            falcon = {"mixer_rms_eps": m.bcdt_rms_eps} if m.bcdt_rms else {}
            mt = "falcon_mamba" if m.bcdt_rms else "mamba"
            hf = dict(architectures=[HF_ARCHITECTURES[mt]], model_type=mt, **common, **falcon,
                      intermediate_size=m.d_inner, time_step_rank=m.dt_rank,
                      time_step_scale=float(ssm.get("dt_scale", 1.0)), time_step_min=float(ssm.get("dt_min", 0.001)),
                      time_step_max=float(ssm.get("dt_max", 0.1)),
                      time_step_init_scheme=ssm.get("dt_init", "random"),
                      time_step_floor=float(ssm.get("dt_init_floor", 1e-4)), use_mambapy=False)
        else:
            if m.D_has_hdim:
                problems.append("D_has_hdim=True (D per channel) has no transformers equivalent (D per head)")
            if not m.rmsnorm:
                problems.append("rmsnorm=False (no gated norm in the mixer) has no transformers equivalent")
            elif m.norm.norm_before_gate:
                problems.append("norm_before_gate=True has no transformers equivalent (always norm(y * silu(z)))")
            elif m.norm.eps != config.norm_epsilon:
                problems.append(f"the gated norm's epsilon {m.norm.eps} differs from norm_epsilon "
                                f"{config.norm_epsilon}; transformers uses layer_norm_epsilon for both")
            lo, hi = m.dt_limit
            hf = dict(architectures=[HF_ARCHITECTURES["mamba2"]], model_type="mamba2", **common,
                      num_heads=m.nheads, head_dim=m.headdim, n_groups=m.ngroups, chunk_size=m.chunk_size,
                      time_step_rank=math.ceil(config.d_model / 16), time_step_min=float(ssm.get("dt_min", 0.001)),
                      time_step_max=float(ssm.get("dt_max", 0.1)),
                      time_step_floor=float(ssm.get("dt_init_floor", 1e-4)),
                      # a bare Infinity: read by transformers 4.x and 5.x alike
                      time_step_limit=[float(lo), float(hi)], rms_norm=True, norm_before_gate=False)
    else:
        problems.append("the model has no Mamba mixer layer")
    if problems:
        raise CheckpointError.listing(f"cannot save this model in transformers format ({layer})", problems)
    hf["dtype"] = str(model.backbone.embedding.weight.dtype).replace("torch.", "")
    for key in _TOKEN_ID_FIELDS:
        if extra and key in extra:
            hf[key] = extra[key]
    return dict(sorted(hf.items()))



def hf_names(keys: list[str], where: str) -> dict[str, str]:
    """transformers key -> mambakit key for the keys of a file (a base model's keys get the ``backbone.`` prefix)."""
    base = keys and not any(k.startswith("backbone.") for k in keys) and \
        any(k.startswith(("embeddings.", "embedding.", "layers.")) for k in keys)
    names: dict[str, str] = {}
    for k in keys:
        ours = "backbone." + k if base and not k.startswith("lm_head.") else k
        ours = EMBEDDING_KEY if ours == HF_EMBEDDING_KEY else ours
        if ours in names.values():
            raise CheckpointError(f"{where}: both {HF_EMBEDDING_KEY!r} and {EMBEDDING_KEY!r} are present")
        names[k] = ours
    return names


def hf_name(key: str) -> str:
    """The transformers name of a mambakit key."""
    return HF_EMBEDDING_KEY if key == EMBEDDING_KEY else key


def hf_state(model: torch.nn.Module, name: Callable[[str], str] = hf_name) -> dict[str, torch.Tensor]:
    """The state dict in transformers names (`name` of each mambakit key): the vocabulary unpadded, a tied lm_head
    left out, no shared memory."""
    vocab = model.config.vocab_size
    tied = check_tie(model)
    out = {}
    for k, t in cpu_state(model).items():
        if tied and k == LM_HEAD_KEY:
            continue
        if k in (EMBEDDING_KEY, LM_HEAD_KEY) and t.shape[0] != vocab:
            t = t[:vocab]  # transformers does not pad the vocabulary; the padding rows are never a real token
        out[name(k)] = t.contiguous().clone()
    return out


def hf_writer(model: torch.nn.Module) -> Callable[[Path], None]:
    """What writes `model` in transformers format into a folder; every reason it cannot is raised here, before any
    file is written."""
    source = getattr(model, "pretrained_source", None) or {}
    extra = source.get("config") if source.get("format") == "hf" else None
    hf_config = config_to_hf(model, extra)
    state = hf_state(model)

    def write(tmp: Path) -> None:
        write_json(tmp / CONFIG_NAME, hf_config)
        write_safetensors(state, tmp / SAFETENSORS_NAME)

    return write
