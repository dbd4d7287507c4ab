"""`mamba_ssm.models.config_mamba.MambaConfig`: mambakit's config with the official defaults (a 2.8B model:
d_model 2560, n_layer 64, vocab 50277, fused_add_norm True); mambakit's own `MambaConfig` keeps its small ones."""
from __future__ import annotations

from dataclasses import dataclass

from mambakit.models.config import MambaConfig as MambaKitConfig

__all__ = ["MambaConfig"]


@dataclass
class MambaConfig(MambaKitConfig):
    """The official defaults; every field and check of `mambakit.models.config.MambaConfig`."""

    d_model: int = 2560
    n_layer: int = 64
    vocab_size: int = 50277
    fused_add_norm: bool = True
