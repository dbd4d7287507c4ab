"""Old import path of SSD's Triton kernels and launchers, now `mambakit.ops.ssd.triton`.

The same module object (not a copy), so that code setting its attributes (tests, benchmarks) still reaches it.
"""
import sys

from mambakit.ops.ssd import triton as _kernels

sys.modules[__name__] = _kernels
