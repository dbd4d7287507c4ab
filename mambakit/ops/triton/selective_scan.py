"""Old import path of the selective scan's Triton kernels, now `mambakit.ops.selective_scan.triton`.

The same module object (not a copy), so that code setting its attributes (tests, benchmarks) still reaches it.
"""
import sys

from mambakit.ops.selective_scan import triton as _kernels

sys.modules[__name__] = _kernels
