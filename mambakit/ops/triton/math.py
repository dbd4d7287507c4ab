"""Small ``@triton.jit`` math shared by the kernels of every op."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softplus(x):
    """torch's softplus (threshold 20) in float32: x past 20, else log1p(exp(x)) built from log as
    log(w) * e / (w - 1) with e = exp(x), w = 1 + e (accurate where e is tiny; no libdevice, so it also runs on the
    interpreter). The unused branch never divides by zero."""
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * e / tl.where(w == 1.0, 1.0, w - 1.0))
    return tl.where(x > 20.0, x, tl.where(x == x, lp, x))  # NaN stays NaN (the minimum above drops it)
