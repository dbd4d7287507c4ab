"""mambakit: Mamba selective state-space models in plain PyTorch (CPU) and Triton (GPU)."""
from mambakit.errors import CheckpointError, MambaKitError
from mambakit.layers.mamba import Mamba
from mambakit.layers.mamba2 import Mamba2
from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel
from mambakit.models import io as _io  # noqa: F401  (gives MambaLMHeadModel from_pretrained / save_pretrained)
from mambakit.ops import mamba_chunk_scan_combined, selective_scan_fn, selective_scan_ref

__version__ = "0.1.0"
__all__ = ["Mamba", "Mamba2", "mamba_chunk_scan_combined", "MambaConfig", "MambaLMHeadModel", "MambaKitError",
           "CheckpointError", "selective_scan_fn",
           "selective_scan_ref", "__version__"]
