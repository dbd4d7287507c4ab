"""Which format a checkpoint folder holds, and the two calls that dispatch on it: `from_pretrained` (transformers,
mamba_ssm or native folder -> MambaLMHeadModel) and `save_pretrained` (MambaLMHeadModel -> transformers or mamba_ssm
folder). Folders are local only: nothing is downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from mambakit.errors import CheckpointError, MambaKitError
from mambakit.models.config import MambaConfig
from mambakit.models.io import hybrid, mamba_ssm, native, transformers
from mambakit.models.io.atomic import write_folder
from mambakit.models.io.folder import read_json, resolve_folder
from mambakit.models.io.names import CONFIG_NAME, META_NAME, is_weights_or_config
from mambakit.models.io.state import load_model, resolve_dtype
from mambakit.models.io.weights import find_weights
from mambakit.models.hybrid import HybridConfig
from mambakit.models.lm import MambaLMHeadModel

FORMATS = ("hf", "mamba_ssm", "mambakit")  # what detect_format returns
SAVE_FORMATS = ("hf", "mamba_ssm")

def _detect(directory: Path, raw: dict[str, Any]) -> str:
    where = str(directory / CONFIG_NAME)
    if "model_type" in raw:
        mt = raw["model_type"]
        if mt in transformers.HF_MODEL_TYPES or mt in hybrid.HYBRID_MODEL_TYPES:
            return "hf"
        supported = ("supported transformers model types: "
                     f"{list(transformers.HF_MODEL_TYPES) + list(hybrid.HYBRID_MODEL_TYPES)}")
        if mt in transformers.HF_RELATED_TYPES:
            raise CheckpointError(f"{where!r}: model_type {mt!r} is not supported (its computation differs from "
                                  f"Mamba / Mamba-2); {supported}")
        raise CheckpointError(f"{where!r}: model_type {mt!r} is not supported; {supported}")
    if "d_model" in raw:
        return "mambakit" if (directory / META_NAME).is_file() else "mamba_ssm"
    raise CheckpointError(f"{where!r} is neither a transformers config (no 'model_type') nor a mamba_ssm / mambakit "
                          "config (no 'd_model')")


def detect_format(path: Union[str, os.PathLike]) -> str:
    """The format of a checkpoint folder: "hf" (transformers), "mamba_ssm" or "mambakit" (native)."""
    directory = resolve_folder(path)
    return _detect(directory, read_json(directory / CONFIG_NAME))


def from_pretrained(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                    dtype: Union[torch.dtype, str, None] = None, allow_non_finite: bool = False) -> MambaLMHeadModel:
    """Load a `MambaLMHeadModel` from a LOCAL checkpoint folder in transformers, mamba_ssm or mambakit format (a
    `HybridLM` for the transformers hybrids, `mambakit.models.io.hybrid.HYBRID_MODEL_TYPES`).

    dtype: None keeps torch's default dtype (float32) for the weights; "auto" uses the dtype of the stored
    embedding; or a torch dtype / name ("bfloat16", ...). A_log, D and the dt bias stay float32 as in mamba_ssm.
    The model is returned in eval mode, with `model.pretrained_source` = {"format", "path", "config"} (the raw
    config.json) so that `save_pretrained` can keep the token ids of a transformers checkpoint.
    Raises CheckpointError naming every problem (missing folder, unsupported config values, missing / unexpected /
    mis-shaped tensors), the tensors checked against the config before the model is allocated; weights holding NaN
    or infinite values are refused, naming them, unless allow_non_finite is True.
    """
    directory = resolve_folder(path)
    raw = read_json(directory / CONFIG_NAME)
    fmt = _detect(directory, raw)
    dtype = resolve_dtype(dtype)
    where = repr(str(directory))
    if fmt == "mambakit":
        model = native.load_checkpoint(directory, device=device, dtype=dtype, allow_non_finite=allow_non_finite)
    elif fmt == "hf" and raw["model_type"] in hybrid.HYBRID_MODEL_TYPES:
        mt = raw["model_type"]
        config = hybrid.config_from_hybrid_hf(raw, where=f"{str(directory / CONFIG_NAME)!r} (transformers {mt})")
        rename, to_file = hybrid.hybrid_names(config, mt)
        model = load_model(config, find_weights(directory), where, device=device, dtype=dtype, rename=rename,
                           to_file=to_file, allow_non_finite=allow_non_finite)
    elif fmt == "hf":
        config = transformers.config_from_hf(
            raw, where=f"{str(directory / CONFIG_NAME)!r} (transformers {raw['model_type']})")
        model = load_model(config, find_weights(directory), where, device=device, dtype=dtype,
                           rename=lambda keys: transformers.hf_names(keys, where), to_file=transformers.hf_name,
                           allow_non_finite=allow_non_finite)
    else:
        config = mamba_ssm.config_from_mamba_ssm(raw, where=f"{str(directory / CONFIG_NAME)!r} ({fmt})")
        model = load_model(config, find_weights(directory), where, device=device, dtype=dtype,
                           allow_non_finite=allow_non_finite)
        mamba_ssm.mimo_from_official(model)
    model.pretrained_source = {"format": fmt, "path": str(directory), "config": raw}
    return model


def save_pretrained(model: torch.nn.Module, path: Union[str, os.PathLike], format: str = "hf") -> Path:
    """Save `model` (a MambaLMHeadModel, or a HybridLM: format "hf" only) to the folder `path`, atomically, and
    return the folder.

    format="hf": config.json (model_type mamba / mamba2) + model.safetensors with transformers key names, loadable by
    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` with the same logits. The vocabulary is written
    unpadded (config.vocab_size rows), as transformers expects; a tied lm_head is not stored.
    format="mamba_ssm": the official layout, config.json + pytorch_model.bin (with lm_head.weight, padded vocab).
    Saving into an existing folder replaces its weights and configs and keeps its other files (tokenizer, README).
    Raises CheckpointError listing every reason when the model cannot be expressed in the target format.
    """
    config: Optional[MambaConfig] = getattr(model, "config", None)
    if isinstance(config, HybridConfig) and hasattr(model, "backbone"):
        if format != "hf":
            raise MambaKitError(f"a hybrid model (HybridLM) saves in format 'hf' only, got {format!r}")
        return write_folder(Path(path).expanduser(), hybrid.hybrid_writer(model),
                            keep=lambda name: not is_weights_or_config(name))
    if not isinstance(config, MambaConfig) or not hasattr(model, "backbone"):
        raise MambaKitError(f"save_pretrained expects a MambaLMHeadModel, got {type(model).__name__}")
    if format not in SAVE_FORMATS:
        raise MambaKitError(f"format must be 'hf' or 'mamba_ssm', got {format!r}")
    write = transformers.hf_writer(model) if format == "hf" else mamba_ssm.mamba_ssm_writer(model)
    return write_folder(Path(path).expanduser(), write, keep=lambda name: not is_weights_or_config(name))
