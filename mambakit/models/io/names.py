"""File names of a checkpoint folder and the tensor and config keys that more than one format uses."""
from __future__ import annotations

import re

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"  # native and transformers weights
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"  # sharded safetensors
BIN_NAME = "pytorch_model.bin"  # mamba_ssm weights (also older transformers folders)
BIN_INDEX_NAME = "pytorch_model.bin.index.json"  # sharded .bin
META_NAME = "mambakit.json"  # marks a native checkpoint
OPTIMIZER_NAME = "optimizer.pt"  # native, optional
TRAINER_STATE_NAME = "trainer_state.json"  # native, optional

EMBEDDING_KEY = "backbone.embedding.weight"  # mambakit and mamba_ssm
HF_EMBEDDING_KEY = "backbone.embeddings.weight"  # transformers
LM_HEAD_KEY = "lm_head.weight"  # left out of native and transformers files when tied to the embedding

# ssm_cfg entries of mambakit that select a runtime backend, not the function computed (no other format has them).
RUNTIME_SSM_KEYS = ("scan_backend",)

_WEIGHTS_OR_CONFIG = re.compile(
    r"^(config\.json|mambakit\.json|.*\.safetensors|.*\.safetensors\.index\.json|pytorch_model.*\.bin|"
    r"pytorch_model\.bin\.index\.json)$")


def is_weights_or_config(name: str) -> bool:
    """Whether a file name is a config or weights file of some format (a new save replaces all of them)."""
    return _WEIGHTS_OR_CONFIG.match(name) is not None
