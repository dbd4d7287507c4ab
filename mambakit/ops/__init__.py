"""Pure functions on tensors: the scans, the conv, their references and their dispatch."""
from mambakit.ops.conv1d import causal_conv1d_fn, causal_conv1d_update
from mambakit.ops.selective_scan import (
    selective_scan_chunked,
    selective_scan_fn,
    selective_scan_ref,
    selective_state_update,
)
from mambakit.ops.ssd import (
    mamba_chunk_scan_combined,
    ssd_attention_matrix,
    ssd_chunked,
    ssd_quadratic,
    ssd_recurrent,
    ssd_step,
)

__all__ = [
    "causal_conv1d_fn", "causal_conv1d_update", "selective_scan_chunked", "selective_scan_fn", "selective_scan_ref",
    "selective_state_update", "mamba_chunk_scan_combined", "ssd_attention_matrix", "ssd_chunked",
    "ssd_quadratic", "ssd_recurrent", "ssd_step",
]
