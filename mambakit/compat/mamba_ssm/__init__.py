"""`mamba_ssm` on mambakit: the official top-level names (selective_scan_fn, mamba_inner_fn, Mamba, Mamba2,
Mamba3, MambaLMHeadModel); the submodules mirror the official module paths."""
from mambakit.compat.mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from mambakit.compat.mamba_ssm.modules.mamba2 import Mamba2
from mambakit.compat.mamba_ssm.modules.mamba3 import Mamba3
from mambakit.compat.mamba_ssm.modules.mamba_simple import Mamba
from mambakit.compat.mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn

__all__ = ["Mamba", "Mamba2", "Mamba3", "MambaLMHeadModel", "mamba_inner_fn", "selective_scan_fn"]
