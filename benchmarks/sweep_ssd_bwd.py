"""Launch-parameter sweep of the Triton SSD backward kernel (one or two launches x num_warps x num_stages), bf16,
65536 tokens.

    python3 benchmarks/sweep_ssd_bwd.py     (GPU)
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from benchmarks.bench_ssd import ssd_inputs  # noqa: E402
from mambakit.ops.ssd import mamba_chunk_scan_combined  # noqa: E402
from mambakit.ops.triton import ssd as tssd  # noqa: E402


def main() -> None:
    original = tssd._Plan.__init__
    print(f"# {torch.cuda.get_device_name()}: forward+backward ms, bf16, 32 x 64 heads, 65536 tokens")
    for N, L in ((64, 2048), (128, 2048)):
        kw = ssd_inputs(65536 // L, L, 32, 64, 1, N, torch.bfloat16, init=False)
        kw.pop("z")
        leaves = {k: kw[k].detach().requires_grad_() for k in ("x", "dt", "B", "C")}
        args = dict(kw, **leaves)
        gy = torch.randn_like(kw["x"])
        for split, warps, stages in ((False, 4, 1), (False, 4, 2), (True, 4, 1), (True, 4, 2), (True, 8, 1),
                                     (True, 8, 2)):
            def init(self, x, B, chunk_size, _w=warps, _s=stages, _p=split):
                original(self, x, B, chunk_size)
                self.bwd_warps, self.bwd_stages, self.split_bwd = _w, _s, _p
            tssd._Plan.__init__ = init
            try:
                ms = do_bench(lambda: mamba_chunk_scan_combined(**args, backend="triton").backward(gy),
                              warmup=10, rep=100, grad_to_none=list(leaves.values()), return_mode="median")
                print(f"N {N:4d} seqlen {L:5d} split {split:d} warps {warps} stages {stages}: {ms:7.3f}", flush=True)
            except Exception as exc:  # out of shared memory etc.
                print(f"N {N:4d} seqlen {L:5d} split {split:d} warps {warps} stages {stages}: failed "
                      f"({type(exc).__name__})")
        tssd._Plan.__init__ = original


if __name__ == "__main__":
    main()
