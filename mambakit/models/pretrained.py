"""Load and save the checkpoints users already have: Hugging Face `transformers` Mamba / Mamba-2 folders, the official
`mamba_ssm` format, and mambakit's own checkpoints, with the same numerics.

Supported folders (local only; nothing is downloaded):

* Hugging Face `transformers` (config.json with ``model_type`` "mamba" or "mamba2"): weights in model.safetensors,
  sharded safetensors (model.safetensors.index.json), pytorch_model.bin or sharded .bin. HF names the embedding
  ``backbone.embeddings.weight`` (mambakit and mamba_ssm: ``backbone.embedding.weight``) and omits ``lm_head.weight``
  when the embeddings are tied. HF does not pad the vocabulary, so such a model is built with
  ``pad_vocab_size_multiple=1``: its logits have exactly the checkpoint's ``vocab_size`` columns.
* `mamba_ssm` (config.json with ``d_model``, ``n_layer``, ``ssm_cfg``, ... + pytorch_model.bin, official key names).
* mambakit's native checkpoints (config.json + model.safetensors + mambakit.json), read by
  `mambakit.models.checkpoint.load_checkpoint`.

`.bin` files are read with ``torch.load(weights_only=True)``: never arbitrary pickle.

`save_pretrained(model, path, format="hf")` writes a folder that ``MambaForCausalLM`` / ``Mamba2ForCausalLM``
``from_pretrained`` loads with the same logits; ``format="mamba_ssm"`` writes the official layout. Saves are atomic:
everything is written to a temporary folder beside the target and renamed into place.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch

from mambakit.errors import CheckpointError, MambaKitError
from mambakit.models.config import MambaConfig

__all__ = ["from_pretrained", "save_pretrained", "detect_format", "config_from_hf", "config_to_hf",
           "config_from_mamba_ssm", "config_to_mamba_ssm", "read_weights"]

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
NATIVE_META_NAME = "mambakit.json"

EMBEDDING_KEY = "backbone.embedding.weight"  # mambakit / mamba_ssm
HF_EMBEDDING_KEY = "backbone.embeddings.weight"  # transformers
LM_HEAD_KEY = "lm_head.weight"

HF_MODEL_TYPES = ("mamba", "mamba2")
HF_ARCHITECTURES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}
# Other model types of the family that transformers knows; their computation differs, so they are refused by name.
HF_RELATED_TYPES = ("falcon_mamba", "jamba", "bamba", "zamba", "zamba2", "nemotron_h", "granitemoehybrid",
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
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")

# ssm_cfg entries of the official package that only matter for initialisation or for its CUDA kernels.
_MAMBA_SSM_IGNORED_SSM_KEYS = ("use_fast_path", "use_mem_eff_path", "conv_init", "process_group", "sequence_parallel")
# ssm_cfg entries of mambakit that select a runtime backend, not the function computed.
_RUNTIME_SSM_KEYS = ("scan_backend",)
_MAMBA_SSM_FIELDS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
                     "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings")
OFFICIAL_NORM_EPS = 1e-5  # mamba_ssm hard-codes the epsilon of its RMSNorms (no config field)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MAX_LISTED = 12


# ----------------------------------------------------------------------------------------------------------------------
# small helpers
def _fail(where: str, problems: list[str]) -> CheckpointError:
    if len(problems) == 1:
        return CheckpointError(f"{where}: {problems[0]}")
    return CheckpointError(f"{where}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def _list(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return f"({len(keys)}): [{shown}{more}]"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _json_float(v: Any) -> float:
    """A float from JSON as transformers writes it: a number, {"__float__": "Infinity"} (5.x), a bare Infinity
    (4.x, parsed by Python's json as float('inf')), or a string such as "inf"."""
    if _is_number(v):
        return float(v)
    if isinstance(v, dict) and set(v) == {"__float__"} and isinstance(v["__float__"], str):
        v = v["__float__"]
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    raise ValueError(f"not a number: {v!r}")


def _resolve_dtype(dtype: Any) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().replace("torch.", "")
        if key in _DTYPES:
            return _DTYPES[key]
    raise MambaKitError(f"dtype must be a torch floating dtype, one of {sorted(_DTYPES)}, 'auto' or None; "
                        f"got {dtype!r}")


# ----------------------------------------------------------------------------------------------------------------------
# locating and recognising a checkpoint folder
def _resolve_dir(path: Union[str, os.PathLike]) -> Path:
    text = os.fspath(path)
    p = Path(text).expanduser()
    if not p.exists():
        if _HUB_ID.match(text) and not text.startswith("."):
            local = text.split("/")[-1]
            raise CheckpointError(
                f"no folder {text!r} found locally. If it is a Hugging Face Hub id: mambakit does not download, so "
                f"download it first, e.g. `huggingface-cli download {text} --local-dir {local}` (or `hf download "
                f"{text} --local-dir {local}`), then pass the folder: from_pretrained({local!r})")
        raise CheckpointError(f"checkpoint folder {text!r} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {text!r} is a file; pass the folder that holds {CONFIG_NAME} and the "
                              "weights")
    if not (p / CONFIG_NAME).is_file():
        hint = ""
        snapshots = p / "snapshots"
        if snapshots.is_dir():  # a Hugging Face cache entry (models--org--name)
            subs = sorted(s.name for s in snapshots.iterdir() if s.is_dir())
            if subs:
                hint = f"; this looks like a Hugging Face cache entry: pass {str(snapshots / subs[-1])!r}"
        else:
            inner = sorted(c.name for c in p.iterdir() if c.is_dir() and (c / CONFIG_NAME).is_file())
            if inner:
                hint = f"; sub-folders holding a {CONFIG_NAME}: {inner}"
        raise CheckpointError(f"folder {text!r} holds no {CONFIG_NAME}, so it is not a checkpoint{hint}")
    return p


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def detect_format(path: Union[str, os.PathLike]) -> str:
    """The format of a checkpoint folder: "hf" (transformers), "mamba_ssm" or "mambakit" (native)."""
    directory = _resolve_dir(path)
    return _detect(directory, _read_json(directory / CONFIG_NAME))


def _detect(directory: Path, raw: dict[str, Any]) -> str:
    where = str(directory / CONFIG_NAME)
    if "model_type" in raw:
        mt = raw["model_type"]
        if mt in HF_MODEL_TYPES:
            return "hf"
        if mt in HF_RELATED_TYPES:
            raise CheckpointError(f"{where!r}: model_type {mt!r} is not supported (its computation differs from "
                                  f"Mamba / Mamba-2); supported transformers model types: {list(HF_MODEL_TYPES)}")
        raise CheckpointError(f"{where!r}: model_type {mt!r} is not supported; supported transformers model types: "
                              f"{list(HF_MODEL_TYPES)}")
    if "d_model" in raw:
        if (directory / NATIVE_META_NAME).is_file():
            return "mambakit"
        return "mamba_ssm"
    raise CheckpointError(f"{where!r} is neither a transformers config (no 'model_type') nor a mamba_ssm / mambakit "
                          "config (no 'd_model')")


# ----------------------------------------------------------------------------------------------------------------------
# transformers config <-> MambaConfig
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

    pos_int = lambda v: _is_int(v) and v > 0  # noqa: E731
    integral = lambda v: _is_number(v) and float(v) == int(v) and v > 0  # noqa: E731
    is_bool = lambda v: isinstance(v, bool)  # noqa: E731
    pos_num = lambda v: _is_number(v) and v > 0  # noqa: E731

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

    if mt == "mamba":
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
            dt_limit = (_json_float(limit[0]), _json_float(limit[1]))
            if any(math.isnan(x) for x in dt_limit) or not 0.0 <= dt_limit[0] < dt_limit[1]:
                raise ValueError("expected 0 <= low < high")
        except ValueError as exc:
            problems.append(f"time_step_limit must be [low, high] with 0 <= low < high (high may be Infinity), got "
                            f"{limit!r} ({exc})")
        ssm_cfg = dict(layer="Mamba2", d_state=d_state, d_conv=d_conv, expand=expand, headdim=head_dim,
                       ngroups=n_groups, chunk_size=chunk_size, dt_limit=dt_limit, bias=bias, conv_bias=conv_bias,
                       norm_eps=eps, rmsnorm=True, norm_before_gate=False, D_has_hdim=False, **init)
    if problems:
        raise _fail(f"unsupported {where}", problems)
    try:
        return MambaConfig(d_model=d_model, d_intermediate=0, n_layer=n_layer, vocab_size=vocab, ssm_cfg=ssm_cfg,
                           rms_norm=True, residual_in_fp32=residual_in_fp32, pad_vocab_size_multiple=1,
                           tie_embeddings=tie, norm_epsilon=float(eps))
    except MambaKitError as exc:
        raise CheckpointError(f"unsupported {where}: {exc}") from exc


def _mixer0(model: torch.nn.Module) -> torch.nn.Module:
    return model.backbone.layers[0].mixer


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
    known = {"layer", *_RUNTIME_SSM_KEYS}
    layer = config.mixer_layer
    if layer not in ("Mamba1", "Mamba2"):
        raise CheckpointError(f"cannot save this model in transformers format: its mixer {layer!r} is neither "
                              "Mamba1 nor Mamba2")
    ssm = config.ssm_cfg
    hf: dict[str, Any] = {}
    if layer == "Mamba1":
        known |= {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                  "dt_init_floor", "conv_bias", "bias"}
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
        if not (_is_number(expand) and float(expand) == int(expand)):
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
            hf = dict(architectures=[HF_ARCHITECTURES["mamba"]], model_type="mamba", **common,
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
        raise _fail(f"cannot save this model in transformers format ({layer})", problems)
    hf["dtype"] = str(model.backbone.embedding.weight.dtype).replace("torch.", "")
    for key in _TOKEN_ID_FIELDS:
        if extra and key in extra:
            hf[key] = extra[key]
    return dict(sorted(hf.items()))


# ----------------------------------------------------------------------------------------------------------------------
# mamba_ssm config <-> MambaConfig
def config_from_mamba_ssm(raw: dict[str, Any], where: str = CONFIG_NAME) -> MambaConfig:
    """MambaConfig from a config.json in mamba_ssm field names (mambakit's own config is a superset)."""
    problems: list[str] = []
    data = dict(raw)
    known = set(MambaConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        problems.append(f"unknown fields {unknown} (known: {sorted(known)})")
    ssm = data.get("ssm_cfg") or {}
    if not isinstance(ssm, dict):
        problems.append(f"ssm_cfg must be an object, got {ssm!r}")
        ssm = {}
    ssm = dict(ssm)
    for key in _MAMBA_SSM_IGNORED_SSM_KEYS:
        ssm.pop(key, None)
    if "d_ssm" in ssm:
        d_ssm = ssm.pop("d_ssm")
        d_inner = None
        if _is_int(data.get("d_model")) and _is_number(ssm.get("expand", 2)):
            d_inner = int(ssm.get("expand", 2) * data["d_model"])
        if d_ssm is not None and d_ssm != d_inner:
            problems.append(f"ssm_cfg d_ssm={d_ssm!r} (an SSM narrower than d_inner={d_inner}) is not supported")
    if isinstance(ssm.get("dt_limit"), list):
        try:
            ssm["dt_limit"] = tuple(_json_float(x) for x in ssm["dt_limit"])
        except ValueError as exc:
            problems.append(f"ssm_cfg dt_limit {ssm['dt_limit']!r}: {exc}")
    if isinstance(ssm.get("A_init_range"), list):
        ssm["A_init_range"] = tuple(ssm["A_init_range"])
    data["ssm_cfg"] = ssm
    if data.get("rms_norm", True) is not True:
        problems.append("rms_norm=false (LayerNorm blocks) is not supported; mambakit blocks use RMSNorm")
    if problems:
        raise _fail(f"unsupported {where}", problems)
    try:
        return MambaConfig(**{k: v for k, v in data.items() if k in known})
    except (MambaKitError, TypeError) as exc:
        raise CheckpointError(f"unsupported {where}: {exc}") from exc


def config_to_mamba_ssm(model: torch.nn.Module) -> dict[str, Any]:
    """The official mamba_ssm config.json of `model` (its MambaConfig fields; no norm_epsilon field there)."""
    config: MambaConfig = model.config
    problems = []
    if config.mixer_layer not in ("Mamba1", "Mamba2"):
        problems.append(f"mixer {config.mixer_layer!r}: mamba_ssm has only Mamba1 and Mamba2")
    if config.norm_epsilon != OFFICIAL_NORM_EPS:
        problems.append(f"norm_epsilon={config.norm_epsilon} (mamba_ssm hard-codes {OFFICIAL_NORM_EPS})")
    if not config.rms_norm:
        problems.append("rms_norm=False")
    ssm = {k: v for k, v in config.ssm_cfg.items() if k not in _RUNTIME_SSM_KEYS}
    if config.mixer_layer == "Mamba2":
        eps = ssm.pop("norm_eps", OFFICIAL_NORM_EPS)
        if eps != OFFICIAL_NORM_EPS:
            problems.append(f"ssm_cfg norm_eps={eps} (mamba_ssm hard-codes {OFFICIAL_NORM_EPS} in the gated norm)")
        if "dt_limit" in ssm:
            lo, hi = (float(x) for x in ssm["dt_limit"])
            if (lo, hi) == (0.0, float("inf")):
                del ssm["dt_limit"]  # official compares with the tuple (0, inf); a JSON list would miss its fast path
            else:
                ssm["dt_limit"] = [lo, hi]
        if "A_init_range" in ssm:
            ssm["A_init_range"] = list(ssm["A_init_range"])
    if problems:
        raise _fail("cannot save this model in mamba_ssm format", problems)
    out = {k: getattr(config, k) for k in _MAMBA_SSM_FIELDS}
    out["ssm_cfg"] = ssm
    return out


# ----------------------------------------------------------------------------------------------------------------------
# weights
def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ...
        raise CheckpointError(f"cannot read {str(path)!r}: {exc}") from exc


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors of many types, including refused (non-tensor) objects
        raise CheckpointError(f"cannot read {str(path)!r} as a tensor state dict (read with weights_only=True, "
                              f"never arbitrary pickle): {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict) and len(obj) <= 4:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{str(path)!r} does not hold a flat state dict (name -> tensor)")
    return dict(obj)


def _load_sharded(directory: Path, index_name: str, reader: Callable[[Path], dict]) -> dict[str, torch.Tensor]:
    index_path = directory / index_name
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{str(index_path)!r} has no 'weight_map'")
    files = sorted(set(weight_map.values()))
    missing_files = [f for f in files if not isinstance(f, str) or not (directory / f).is_file()]
    if missing_files:
        raise CheckpointError(f"{str(index_path)!r} names shard files that are not in the folder: {missing_files}")
    state: dict[str, torch.Tensor] = {}
    problems = []
    for f in files:
        part = reader(directory / f)
        listed = {k for k, v in weight_map.items() if v == f}
        absent = listed - set(part)
        if absent:
            problems.append(f"{f} lacks tensors that the index places there, {_list(absent)}")
        for k, v in part.items():
            if k in state:
                problems.append(f"tensor {k!r} appears in more than one shard")
            state[k] = v
    if problems:
        raise _fail(f"sharded checkpoint {str(directory)!r}", problems)
    return state


def read_weights(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], str]:
    """The raw tensors of a checkpoint folder (file key names) and the file(s) they came from. Prefers
    model.safetensors, then the sharded safetensors index, then pytorch_model.bin, then its sharded index."""
    directory = Path(path)
    if (directory / SAFETENSORS_NAME).is_file():
        return _load_safetensors(directory / SAFETENSORS_NAME), SAFETENSORS_NAME
    if (directory / SAFETENSORS_INDEX_NAME).is_file():
        return _load_sharded(directory, SAFETENSORS_INDEX_NAME, _load_safetensors), SAFETENSORS_INDEX_NAME
    if (directory / BIN_NAME).is_file():
        return _load_bin(directory / BIN_NAME), BIN_NAME
    if (directory / BIN_INDEX_NAME).is_file():
        return _load_sharded(directory, BIN_INDEX_NAME, _load_bin), BIN_INDEX_NAME
    raise CheckpointError(f"checkpoint {str(directory)!r} holds no weights: expected {SAFETENSORS_NAME}, "
                          f"{SAFETENSORS_INDEX_NAME}, {BIN_NAME} or {BIN_INDEX_NAME}")


def _hf_to_ours(stored: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename transformers keys to mambakit keys; returns the renamed dict and ours -> file name (for messages)."""
    if stored and not any(k.startswith("backbone.") for k in stored) and \
            any(k.startswith(("embeddings.", "embedding.", "layers.")) for k in stored):
        stored = {("backbone." + k if not k.startswith("lm_head.") else k): v for k, v in stored.items()}  # base model
    out: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for k, v in stored.items():
        ours = EMBEDDING_KEY if k == HF_EMBEDDING_KEY else k
        if ours in out:
            raise CheckpointError(f"{where}: both {HF_EMBEDDING_KEY!r} and {EMBEDDING_KEY!r} are present")
        out[ours] = v
        names[ours] = k
    return out, names


def _build_and_load(config: MambaConfig, stored: dict[str, torch.Tensor], names: dict[str, str], where: str,
                    device, dtype: Optional[torch.dtype], ours_to_file: Callable[[str], str]):
    """Build the model on the meta device (no random init), check every tensor, then materialise it from `stored`."""
    from mambakit.models.lm import MambaLMHeadModel  # late import: lm imports the layers and ops

    try:
        model = MambaLMHeadModel(config, device="meta", dtype=dtype)
    except Exception as exc:  # MambaKitError, TypeError for an unknown kwarg, ImportError, ...
        raise CheckpointError(f"{where}: cannot build the model its config describes: {exc}") from exc
    expected = model.state_dict()
    tied = bool(config.tie_embeddings)
    fname = lambda k: names.get(k, ours_to_file(k))  # noqa: E731
    problems = []
    missing = [fname(k) for k in expected if k not in stored and not (tied and k == LM_HEAD_KEY)]
    unexpected = [fname(k) for k in stored if k not in expected]
    if missing:
        problems.append(f"missing tensors {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors (not used by this config) {_list(unexpected)}")
    for k in sorted(k for k in stored if k in expected):
        t = stored[k]
        if tuple(t.shape) != tuple(expected[k].shape):
            problems.append(f"{fname(k)}: shape {tuple(t.shape)} in the file, {tuple(expected[k].shape)} expected "
                            "from config.json")
        elif not (t.is_floating_point() or t.is_complex()):
            problems.append(f"{fname(k)}: dtype {t.dtype} in the file, a floating dtype expected")
    if tied and LM_HEAD_KEY in stored and EMBEDDING_KEY in stored and not problems:
        if not torch.equal(stored[LM_HEAD_KEY], stored[EMBEDDING_KEY]):
            problems.append(f"{LM_HEAD_KEY} differs from the embedding {fname(EMBEDDING_KEY)}, but the config ties "
                            "them (tie_word_embeddings / tie_embeddings is true)")
    if problems:
        raise _fail(f"weights of {where} do not match its config", problems)

    attrs = {name: dict(vars(p)) for name, p in model.named_parameters(remove_duplicate=False)}
    state = {}
    for k, ref in expected.items():
        src = stored[EMBEDDING_KEY] if (tied and k == LM_HEAD_KEY) else stored[k]
        state[k] = src.to(device=device, dtype=ref.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    for name, p in model.named_parameters(remove_duplicate=False):
        for a, v in attrs.get(name, {}).items():
            if not hasattr(p, a):
                setattr(p, a, v)  # _no_weight_decay, _no_reinit, ... markers survive the assignment
    model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover and torch.device(device).type != "meta":
        raise CheckpointError(f"internal error: tensors left unloaded: {leftover}")
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------------------------
def from_pretrained(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                    dtype: Union[torch.dtype, str, None] = None):
    """Load a `MambaLMHeadModel` from a LOCAL checkpoint folder in transformers, mamba_ssm or mambakit format.

    dtype: None keeps torch's default dtype (float32) for the weights; "auto" uses the dtype of the stored
    embedding; or a torch dtype / name ("bfloat16", ...). A_log, D and the dt bias stay float32 as in mamba_ssm.
    The model is returned in eval mode, with `model.pretrained_source` = {"format", "path", "config"} (the raw
    config.json) so that `save_pretrained` can keep the token ids of a transformers checkpoint.
    Raises CheckpointError naming every problem (missing folder, unsupported config values, missing / unexpected /
    mis-shaped tensors).
    """
    directory = _resolve_dir(path)
    raw = _read_json(directory / CONFIG_NAME)
    fmt = _detect(directory, raw)
    auto = isinstance(dtype, str) and dtype.lower() == "auto"
    if not auto:
        dtype = _resolve_dtype(dtype)
    where = repr(str(directory))
    if fmt == "mambakit":
        from mambakit.models import checkpoint as native

        load = getattr(native, "load_checkpoint", None)
        if load is not None and not auto:
            model = load(directory, device=device, dtype=dtype)
            model.pretrained_source = {"format": fmt, "path": str(directory), "config": raw}
            return model
    if fmt == "hf":
        config = config_from_hf(raw, where=f"{str(directory / CONFIG_NAME)!r} (transformers {raw['model_type']})")
        stored, source = read_weights(directory)
        stored, names = _hf_to_ours(stored, where)
        to_file = lambda k: HF_EMBEDDING_KEY if k == EMBEDDING_KEY else k  # noqa: E731
    else:
        config = config_from_mamba_ssm(raw, where=f"{str(directory / CONFIG_NAME)!r} ({fmt})")
        stored, source = read_weights(directory)
        names, to_file = {}, (lambda k: k)
    if auto:
        emb = stored.get(EMBEDDING_KEY)
        dtype = emb.dtype if emb is not None and emb.is_floating_point() else None
    model = _build_and_load(config, stored, names, f"{where} ({source})", device, dtype, to_file)
    model.pretrained_source = {"format": fmt, "path": str(directory), "config": raw}
    return model


# ----------------------------------------------------------------------------------------------------------------------
# saving
_CHECKPOINT_FILE = re.compile(
    r"^(config\.json|mambakit\.json|.*\.safetensors|.*\.safetensors\.index\.json|pytorch_model.*\.bin|"
    r"pytorch_model\.bin\.index\.json)$")


def _fsync(path: Path) -> None:
    from mambakit.models.checkpoint import _fsync_dir

    _fsync_dir(path)  # also flushes a plain file: both just open, fsync and close


def _atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Write a checkpoint folder atomically: `write(tmp)` fills a temporary folder beside `target`, which is then
    renamed into place. Files of an existing `target` that are not weights or configs (tokenizer files, README, ...)
    are carried over; its old weights and configs are not (they would contradict the new ones)."""
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot save to {str(target)!r}: it exists and is not a folder")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        write(tmp)
        if target.is_dir():
            for entry in target.iterdir():
                if _CHECKPOINT_FILE.match(entry.name) or (tmp / entry.name).exists():
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True)
                else:
                    try:
                        os.link(entry, tmp / entry.name, follow_symlinks=False)
                    except OSError:
                        shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
        for f in tmp.iterdir():
            if f.is_file() and not f.is_symlink():
                _fsync(f)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Optional[Path] = None
    try:
        if target.exists():
            old = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _check_tie(model: torch.nn.Module) -> bool:
    """Whether lm_head is tied to the embedding; CheckpointError when the config says tied but the values differ."""
    if not model.config.tie_embeddings:
        return False
    head, emb = model.lm_head.weight, model.backbone.embedding.weight
    if head is not emb and not torch.equal(head.detach().cpu(), emb.detach().cpu()):
        raise CheckpointError("config.tie_embeddings is true but lm_head.weight differs from the embedding "
                              "(call model.tie_weights() or set tie_embeddings=False)")
    return True


def _hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    vocab = model.config.vocab_size
    tied = _check_tie(model)
    out = {}
    for k, t in model.state_dict().items():
        if tied and k == LM_HEAD_KEY:
            continue
        t = t.detach().to("cpu")
        if k in (EMBEDDING_KEY, LM_HEAD_KEY) and t.shape[0] != vocab:
            t = t[:vocab]  # transformers does not pad the vocabulary; the padding rows are never a real token
        out[HF_EMBEDDING_KEY if k == EMBEDDING_KEY else k] = t.contiguous().clone()
    return out


def save_pretrained(model: torch.nn.Module, path: Union[str, os.PathLike], format: str = "hf") -> Path:
    """Save `model` (a MambaLMHeadModel) to the folder `path`, atomically.

    format="hf": config.json (model_type mamba / mamba2) + model.safetensors with transformers key names, loadable by
    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` with the same logits. The vocabulary is written
    unpadded (config.vocab_size rows), as transformers expects; a tied lm_head is not stored.
    format="mamba_ssm": the official layout, config.json + pytorch_model.bin (with lm_head.weight, padded vocab).
    Raises CheckpointError listing every reason when the model cannot be expressed in the target format.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, MambaConfig) or not hasattr(model, "backbone"):
        raise MambaKitError(f"save_pretrained expects a MambaLMHeadModel, got {type(model).__name__}")
    if format not in ("hf", "mamba_ssm"):
        raise MambaKitError(f"format must be 'hf' or 'mamba_ssm', got {format!r}")
    target = Path(path).expanduser()
    if format == "hf":
        source = getattr(model, "pretrained_source", None) or {}
        extra = source.get("config") if source.get("format") == "hf" else None
        hf_config = config_to_hf(model, extra)
        state = _hf_state(model)

        def write(tmp: Path) -> None:
            from safetensors.torch import save_file

            (tmp / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
            save_file(state, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
    else:
        ssm_config = config_to_mamba_ssm(model)
        _check_tie(model)
        state = {k: t.detach().to("cpu").contiguous() for k, t in model.state_dict().items()}

        def write(tmp: Path) -> None:
            (tmp / CONFIG_NAME).write_text(json.dumps(ssm_config, indent=2) + "\n")
            torch.save(state, tmp / BIN_NAME)

    return _atomic_dir(target, write)
