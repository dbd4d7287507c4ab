"""What the ops' Triton kernels share: first-call parallel compiles (`compile`), device facts and the
TRITON_INTERPRET switch read at call time (`device`), jit math (`math`), and the one-token decode kernels
(`decode`, `state_update`, and `gemv`: the projections with their norm fused in).

Each op's own kernels live beside it (`mambakit.ops.<op>.triton`); the modules `selective_scan`, `ssd`, `conv1d`
and `norm` here are their old import paths (the same module objects).
"""
