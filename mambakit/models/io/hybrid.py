"""The Mamba-2 hybrids of `transformers` as `HybridLM` models: which model types, their config.json readers, their
tensor names, and writing them back (``save_pretrained(model, path, format="hf")``).

Supported (one module each for the config fields and tensor names): ``bamba`` (`BambaForCausalLM`, in
`mambakit.models.io.bamba`: Mamba-2 mixers, grouped-query attention with partial RoPE at ``attn_layer_indices``, a
SwiGLU MLP after every mixer) and ``nemotron_h`` (`NemotronHForCausalLM`, in `mambakit.models.io.nemotron_h`: each
layer ONE of a Mamba-2 mixer, attention without positional encoding, a plain MLP or a MoE;
multi-token-prediction heads are refused), ``granitemoehybrid`` (in `mambakit.models.io.bamba`) and ``jamba``
(`JambaForCausalLM`, in `mambakit.models.io.jamba`: Mamba-1 mixers with learned dt / B / C norms, attention and
routed experts every so many layers), ``zamba2`` (`Zamba2ForCausalLM`, in `mambakit.models.io.zamba2`: Mamba-2
layers, some of them using shared attention + MLP blocks with per-use adapters) and ``falcon_h1``
(`FalconH1ForCausalLM`, in `mambakit.models.io.falcon_h1`: attention and Mamba-2 side by side in every layer, µP
multipliers). Every value mambakit would not compute exactly is refused, all of them in
one CheckpointError.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mambakit.errors import CheckpointError
from mambakit.models.hybrid import HybridConfig, HybridLM
from mambakit.models.io import bamba, falcon_h1, jamba, nemotron_h, zamba2
from mambakit.models.io.folder import write_json
from mambakit.models.io.names import CONFIG_NAME, SAFETENSORS_NAME
from mambakit.models.io.transformers import hf_state
from mambakit.models.io.weights import write_safetensors

_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class HybridType:
    """One transformers model type: its class name, config reader (raw, where) -> HybridConfig, tensor-name rule
    (mambakit key, config) -> file key, config writer (model, problems) -> config.json fields, and another prefix a
    file may use for the base model (read as the canonical one)."""

    architecture: str
    read: Callable[[dict[str, Any], str], HybridConfig]
    key: Callable[[str, HybridConfig], str]
    write: Callable[[HybridLM, list[str]], dict[str, Any]]
    aliases: tuple[tuple[str, str], ...] = ()


TYPES: dict[str, HybridType] = {
    "bamba": HybridType("BambaForCausalLM", bamba.bamba_config, bamba.bamba_key, bamba.bamba_hf),
    "nemotron_h": HybridType("NemotronHForCausalLM", nemotron_h.nemotron_config, nemotron_h.nemotron_key,
                             nemotron_h.nemotron_hf, aliases=((r"^model\.", "backbone."),)),
    "granitemoehybrid": HybridType("GraniteMoeHybridForCausalLM", bamba.granite_config, bamba.granite_key,
                                   bamba.granite_hf, aliases=bamba.GRANITE_ALIASES),
    "jamba": HybridType("JambaForCausalLM", jamba.jamba_config, jamba.jamba_key, jamba.jamba_hf),
    "zamba2": HybridType("Zamba2ForCausalLM", zamba2.zamba2_config, zamba2.zamba2_key, zamba2.zamba2_hf),
    "falcon_h1": HybridType("FalconH1ForCausalLM", falcon_h1.falcon_h1_config, falcon_h1.falcon_h1_key,
                            falcon_h1.falcon_h1_hf),
}
HYBRID_MODEL_TYPES = tuple(TYPES)


def config_from_hybrid_hf(raw: dict[str, Any], where: str = CONFIG_NAME) -> HybridConfig:
    """The HybridConfig that computes what transformers computes for this config.json (model_type in
    HYBRID_MODEL_TYPES); CheckpointError listing every unsupported or invalid value."""
    mt = raw.get("model_type")
    if mt not in TYPES:
        raise CheckpointError(f"{where}: model_type must be one of {list(TYPES)}, got {mt!r}")
    return TYPES[mt].read(raw, where)


def hybrid_key_map(config: HybridConfig, model_type: str) -> dict[str, str]:
    """mambakit key -> transformers key for every tensor of a HybridLM of `config`, lm_head included."""
    with torch.device("meta"):
        keys = list(HybridLM(config, device="meta").state_dict())
    rule = TYPES[model_type].key
    return {k: rule(k, config) for k in keys}


def hybrid_names(config: HybridConfig, model_type: str) -> tuple[Callable[[list[str]], dict[str, str]],
                                                                  Callable[[str], str]]:
    """(rename, to_file) for `load_model`: file keys -> mambakit keys (unknown ones kept as they are, to be reported
    as unexpected), and a mambakit key -> its name in the file."""
    ours_to_file = hybrid_key_map(config, model_type)
    file_to_ours = {v: k for k, v in ours_to_file.items()}
    aliases = [(re.compile(pattern), repl) for pattern, repl in TYPES[model_type].aliases]

    def ours(key: str) -> str:
        for pattern, repl in aliases:
            key = pattern.sub(repl, key)
        return file_to_ours.get(key, key)

    return (lambda keys: {k: ours(k) for k in keys}), (lambda k: ours_to_file.get(k, k))


def hybrid_config_to_hf(model: HybridLM, model_type: str = "bamba",
                        extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The transformers config.json of `model` as `model_type`; CheckpointError listing every reason it cannot be."""
    if model_type not in TYPES:
        raise CheckpointError(f"cannot save a hybrid model as transformers model_type {model_type!r}; supported: "
                              f"{list(TYPES)}")
    problems: list[str] = []
    hf = TYPES[model_type].write(model, problems)
    if problems:
        raise CheckpointError.listing(f"cannot save this model in transformers format ({model_type})", problems)
    hf.update(architectures=[TYPES[model_type].architecture], model_type=model_type,
              dtype=str(model.backbone.embedding.weight.dtype).replace("torch.", ""))
    for key in _TOKEN_ID_FIELDS:
        if extra and key in extra:
            hf[key] = extra[key]
    return dict(sorted(hf.items()))


def hybrid_writer(model: HybridLM) -> Callable[[Path], None]:
    """What writes `model` in transformers format into a folder (as the model_type it was loaded from, else the type
    its layers fit: falcon_h1 for parallel mixers, zamba2 with shared blocks, jamba for Mamba-1 mixers,
    granitemoehybrid for packed or MoE MLPs after every mixer, bamba for other MLPs after every mixer, else
    nemotron_h); every reason it cannot is raised here, before any file is written."""
    source = getattr(model, "pretrained_source", None) or {}
    extra = source.get("config") if source.get("format") == "hf" else None
    config = model.config
    default = "nemotron_h"
    if any(s["mixer"] == "parallel" for s in config.layers):
        default = "falcon_h1"
    elif config.shared:
        default = "zamba2"
    elif any(s["mixer"] == "mamba" for s in config.layers):
        default = "jamba"
    elif all(s["mixer"] and s["mlp"] for s in config.layers):
        granite = config.mlp.get("packed") or any(s["mlp"] == "moe" for s in config.layers)
        default = "granitemoehybrid" if granite else "bamba"
    model_type = (extra or {}).get("model_type", default)
    hf_config = hybrid_config_to_hf(model, model_type, extra)
    state = hf_state(model, hybrid_key_map(model.config, model_type).__getitem__)

    def write(tmp: Path) -> None:
        write_json(tmp / CONFIG_NAME, hf_config)
        write_safetensors(state, tmp / SAFETENSORS_NAME)

    return write
