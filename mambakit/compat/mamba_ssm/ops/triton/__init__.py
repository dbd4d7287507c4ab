"""`mamba_ssm.ops.triton`: the decode step (`selective_state_update`) and the norms (`layer_norm`,
`layernorm_gated`). The names mirror the official modules; the work is done by mambakit's dispatchers, which use
Triton kernels for CUDA tensors where they have them and PyTorch elsewhere."""
