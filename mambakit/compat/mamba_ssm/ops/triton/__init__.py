"""`mamba_ssm.ops.triton`: the decode step (`selective_state_update`), the norms (`layer_norm`, `layernorm_gated`)
and the Mamba-2 SSD op with its fused path (`ssd_combined`) and its chunk-level pieces (`ssd_chunk_state`,
`ssd_state_passing`, `ssd_chunk_scan`). The names mirror the official modules; the work is
done by mambakit's dispatchers, which use Triton kernels for CUDA tensors where they have them and PyTorch
elsewhere (the chunk-level pieces are PyTorch on every device)."""
