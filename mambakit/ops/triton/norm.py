"""Old import path of the norms' Triton kernels, now `mambakit.ops.norm.triton`.

The same module object (not a copy), so that code setting its attributes (tests, benchmarks) still reaches it.
"""
import sys

from mambakit.ops.norm import triton as _kernels

sys.modules[__name__] = _kernels
