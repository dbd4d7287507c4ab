"""Pure functions on tensors: the scans, the conv, the norms, their references and their dispatch.

One package per op (`selective_scan`, `ssd`, `conv1d`, `norm`): a reference (`naive`), the PyTorch fast path, the
Triton kernels (`triton`, imported only when used) and one public dispatcher in its ``__init__`` with the backend
vocabulary of `backends`. `loss`: the LM head's cross-entropy without the logits (PyTorch only,
`linear_cross_entropy`). Shared pieces: `dt` (dt processing and the padding mask), `segments` (packed
sequences), `triton/` (first-call compiles, device facts, jit math), `autocast`, `first_call`.
"""
from mambakit.ops.backends import BACKENDS
from mambakit.ops.conv1d import causal_conv1d_fn, causal_conv1d_update, conv_state_after
from mambakit.ops.dt import DEFAULT_DT_LIMIT, mask_dt, process_dt
from mambakit.ops.loss import linear_cross_entropy
from mambakit.ops.norm import rms_norm, rms_norm_gated
from mambakit.ops.segments import causal_segment_mask, segments, sequence_starts
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
    "BACKENDS", "DEFAULT_DT_LIMIT", "causal_conv1d_fn", "causal_conv1d_update", "causal_segment_mask",
    "conv_state_after", "linear_cross_entropy", "mamba_chunk_scan_combined", "mask_dt", "process_dt", "rms_norm",
    "rms_norm_gated", "segments", "selective_scan_chunked", "selective_scan_fn", "selective_scan_ref",
    "selective_state_update", "sequence_starts", "ssd_attention_matrix", "ssd_chunked", "ssd_quadratic",
    "ssd_recurrent", "ssd_step",
]
