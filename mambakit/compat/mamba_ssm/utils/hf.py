"""`mamba_ssm.utils.hf`: `load_config_hf` and `load_state_dict_hf`, reading a local checkpoint folder.

A name that is not a folder is fetched with `huggingface_hub` (only config.json and the weight files) when that
package is installed; mambakit itself never downloads, so without it such a name is a MambaKitError. The weights
are read from model.safetensors, its sharded index, pytorch_model.bin or its sharded index (the official reads only
pytorch_model.bin), .bin files with ``torch.load(weights_only=True)``; the keys are the file's, unchanged.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from mambakit.errors import MambaKitError
from mambakit.models.io import read_weights

__all__ = ["load_config_hf", "load_state_dict_hf"]

CONFIG_NAME = "config.json"
_HUB_FILES = [CONFIG_NAME, "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
              "pytorch_model.bin.index.json"]


def _folder(model_name: Union[str, os.PathLike]) -> Path:
    """The local folder of `model_name`: itself when it is one, else a huggingface_hub snapshot of its config and
    weights (when huggingface_hub is installed)."""
    path = Path(model_name)
    if path.is_dir():
        return path
    try:
        import huggingface_hub
    except ImportError:
        raise MambaKitError(f"model_name must be a local checkpoint folder: {str(model_name)!r} is not one, and "
                            "mambakit does not download (install huggingface_hub to fetch hub models)") from None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id=str(model_name), allow_patterns=_HUB_FILES))
    except Exception as exc:  # the hub's errors (not found, offline, bad name) in one form
        raise MambaKitError(f"model_name {str(model_name)!r} is not a local folder and huggingface_hub could not "
                            f"fetch it: {type(exc).__name__}: {exc}") from exc


def load_config_hf(model_name: Union[str, os.PathLike]) -> dict:
    """The checkpoint's config.json as a dict (the official return value)."""
    path = _folder(model_name) / CONFIG_NAME
    if not path.is_file():
        raise MambaKitError(f"checkpoint {str(model_name)!r} has no {CONFIG_NAME}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise MambaKitError(f"cannot read {str(path)!r}: {exc}") from exc


def load_state_dict_hf(model_name: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None,
                       dtype: Optional[torch.dtype] = None) -> dict:
    """The checkpoint's tensors {file key: tensor}, floating-point ones cast to `dtype` (if given) before they are
    moved to `device` (default: the CPU), as the official intends."""
    state, _ = read_weights(_folder(model_name))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if device is not None:
        state = {k: v.to(device) for k, v in state.items()}
    return state
