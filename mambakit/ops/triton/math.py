"""Small ``@triton.jit`` math shared by the kernels of every op."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softplus(x):
    """torch's softplus (threshold 20) in x's dtype (float32 in most kernels): x past 20, else log1p(exp(x)) built
    from log as log(w) * e / (w - 1) with e = exp(x), w = 1 + e (accurate where e is tiny; no libdevice, so it also
    runs on the interpreter). The unused branch never divides by zero."""
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * e / tl.where(w == 1.0, 1.0, w - 1.0))
    return tl.where(x > 20.0, x, tl.where(x == x, lp, x))  # NaN stays NaN (the minimum above drops it)


@triton.jit
def tanh(x, SMALL: tl.constexpr = 0.25):
    """tanh in x's dtype without libdevice (so it also runs on the interpreter): an odd polynomial up to x^9 for
    |x| < SMALL, where (1 - e) / (1 + e) with e = exp(-2|x|) would cancel; that form beyond. SMALL 0.25 for float32
    (relative error below ~3e-7), 0.01 for float64 (the series' truncation below its rounding). NaN stays NaN."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(a < SMALL, small, big)
    return tl.where(x < 0, -t, t)
