"""`causal_conv1d` (Dao-AILab/causal-conv1d) on mambakit: `causal_conv1d_fn`, `causal_conv1d_update`; the packed
sequences' conv states in `causal_conv1d.causal_conv1d_varlen` (as official, not re-exported here)."""
from mambakit.compat.causal_conv1d.causal_conv1d_interface import (
    causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref,
)

__version__ = "1.6.1"  # the official version whose interface this mirrors

__all__ = ["causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref"]
