"""Checkpoint I/O of `MambaLMHeadModel`: mambakit's native format, Hugging Face `transformers` folders and the
official `mamba_ssm` layout, local folders only.

Modules, lowest first: `names` (file and key names), `atomic` (the one atomic folder writer), `folder` (finding a
folder, reading its JSON), `weights` (reading tensors or only their headers), `state` (the check of stored tensors
against a config, the tie rule, building the model), then the thin format adapters `native`, `transformers`,
`mamba_ssm`, and `formats` (format detection, `from_pretrained`, `save_pretrained`).

This package sits above `mambakit.models.lm`, which knows nothing about files: importing it (``import mambakit`` does)
gives `MambaLMHeadModel` its `from_pretrained` classmethod and `save_pretrained` method, defined here.
"""
from __future__ import annotations

import os
from typing import Union

import torch

from mambakit.models.io.formats import detect_format, from_pretrained, save_pretrained
from mambakit.models.io.mamba_ssm import config_from_mamba_ssm, config_to_mamba_ssm
from mambakit.models.io.native import (load_checkpoint, load_config, load_optimizer_state, load_trainer_state,
                                       model_state_for_saving, save_checkpoint)
from mambakit.models.io.transformers import config_from_hf, config_to_hf
from mambakit.models.io.weights import read_weights
from mambakit.models.lm import MambaLMHeadModel

__all__ = ["from_pretrained", "save_pretrained", "detect_format", "read_weights", "config_from_hf", "config_to_hf",
           "config_from_mamba_ssm", "config_to_mamba_ssm", "save_checkpoint", "load_checkpoint", "load_config",
           "load_optimizer_state", "load_trainer_state", "model_state_for_saving"]


def _model_from_pretrained(cls: type, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                           dtype: Union[torch.dtype, str, None] = None,
                           allow_non_finite: bool = False) -> MambaLMHeadModel:
    """Load a local checkpoint folder: transformers (mamba / mamba2), mamba_ssm or mambakit format (see
    `mambakit.models.io.from_pretrained`)."""
    return from_pretrained(path, device=device, dtype=dtype, allow_non_finite=allow_non_finite)


def _model_save_pretrained(self: MambaLMHeadModel, path: Union[str, os.PathLike], format: str = "hf") -> None:
    """Write a checkpoint folder that transformers (format="hf") or mamba_ssm (format="mamba_ssm") loads (see
    `mambakit.models.io.save_pretrained`)."""
    save_pretrained(self, path, format=format)


# The one place the model class learns about files: the names users of transformers and mamba_ssm expect.
_model_from_pretrained.__name__, _model_from_pretrained.__qualname__ = ("from_pretrained",
                                                                       "MambaLMHeadModel.from_pretrained")
_model_save_pretrained.__name__, _model_save_pretrained.__qualname__ = ("save_pretrained",
                                                                       "MambaLMHeadModel.save_pretrained")
MambaLMHeadModel.from_pretrained = classmethod(_model_from_pretrained)
MambaLMHeadModel.save_pretrained = _model_save_pretrained
