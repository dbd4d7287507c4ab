"""Old import path of the causal conv's Triton kernels, now `mambakit.ops.conv1d.triton`.

The same module object (not a copy), so that code setting its attributes (tests, benchmarks) still reaches it.
"""
import sys

from mambakit.ops.conv1d import triton as _kernels

sys.modules[__name__] = _kernels
