"""Triton kernels (NVIDIA GPUs, or the CPU interpreter with TRITON_INTERPRET=1) for the ops in `mambakit.ops`."""
