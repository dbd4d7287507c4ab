"""One Mamba-3 block on the GPU: first call, forward, forward+backward; SISO (the layer's default scan, "auto": the
SSD Triton kernels with a per-position log-decay on CUDA, 16-bit inputs on float32 operands with tf32; the chunked
PyTorch form; "ssd" named; the Mamba-3 Triton kernels) and MIMO of rank --mimo-rank (the chunked PyTorch form and
the Triton kernels, chunk 64 / R as the official default); our Mamba-2 block beside them, and the official mamba_ssm
Mamba3 blocks (SISO, MIMO) when importable.

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_mamba3.py [--batch 8] [--seqlen 2048] [--d-model 768]
        [--d-state 128] [--headdim 64] [--mimo-rank 4] [--dtype bfloat16] [--only ssd Mamba2] [--no-official]

The first-call times are of a cold, private Triton cache (compile + any autotune), forward+backward. Times are
medians of triton.testing.do_bench (CUDA events, L2 flushed). Rows go to $OUT/bench_mamba3.jsonl when $OUT is set.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="mambakit-triton-cache-")
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from _common import Rows, device_line, first_call_s, gpu_ms  # noqa: E402

from mambakit.layers.mamba2 import Mamba2  # noqa: E402
from mambakit.layers.mamba3 import Mamba3  # noqa: E402


def _official_mamba3():
    try:
        from mamba_ssm.modules.mamba3 import Mamba3 as Official
    except Exception as exc:  # any failure means "run without it"
        print(f"# official mamba_ssm Mamba3 not importable ({type(exc).__name__}: {exc})")
        return None
    return Official


def _time_block(block: torch.nn.Module, x: torch.Tensor) -> dict:
    params = [p for p in block.parameters() if p.requires_grad]
    grad_out = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            block(x)

    leaf = x.detach().requires_grad_(True)

    def fwd_bwd_leaf():
        block(leaf).backward(grad_out)

    first = first_call_s(fwd_bwd_leaf)
    return dict(first_call_s=first, fwd_ms=gpu_ms(fwd), fwd_bwd_ms=gpu_ms(fwd_bwd_leaf, grad_to_none=params + [leaf]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-state", type=int, default=128)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--mimo-rank", type=int, default=4)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--only", nargs="+", default=None, metavar="WORD",
                   help="time only the blocks whose name contains one of these words (e.g. ssd Mamba2)")
    p.add_argument("--no-official", action="store_true", help="leave out the official blocks")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_mamba3 needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    print(f"# {device_line()}")
    case = dict(batch=args.batch, seqlen=args.seqlen, d_model=args.d_model, d_state=args.d_state,
                headdim=args.headdim, mimo_rank=args.mimo_rank, dtype=args.dtype)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seqlen, args.d_model, device="cuda", dtype=dtype)
    size = dict(d_state=args.d_state, headdim=args.headdim)
    R = args.mimo_rank
    mimo = dict(size, is_mimo=True, mimo_rank=R, chunk_size=max(1, 64 // R))
    blocks = {
        "mambakit Mamba3": lambda: Mamba3(args.d_model, **size),
        "mambakit Mamba3 torch": lambda: Mamba3(args.d_model, **size, scan_backend="torch"),
        "mambakit Mamba3 ssd": lambda: Mamba3(args.d_model, **size, scan_backend="ssd"),
        "mambakit Mamba3 triton": lambda: Mamba3(args.d_model, **size, scan_backend="triton"),
        f"mambakit Mamba3 MIMO R={R} torch": lambda: Mamba3(args.d_model, **mimo, scan_backend="torch"),
        f"mambakit Mamba3 MIMO R={R} triton": lambda: Mamba3(args.d_model, **mimo, scan_backend="triton"),
        "mambakit Mamba2": lambda: Mamba2(args.d_model, **size),
    }
    official = None if args.no_official else _official_mamba3()
    if official is not None:
        blocks["official Mamba3"] = lambda: official(args.d_model, **size)
        blocks[f"official Mamba3 MIMO R={R}"] = lambda: official(args.d_model, **mimo)
    if args.only:
        blocks = {name: make for name, make in blocks.items() if any(w in name for w in args.only)}
    rows = Rows("bench_mamba3")
    for name, make in blocks.items():
        block = make().to("cuda", dtype)
        try:
            rows.add(**case, block=name, **_time_block(block, x))
        except Exception as exc:  # one failing block does not hide the others' numbers
            print(f"# {name} failed: {type(exc).__name__}: {exc}")
        del block
        torch.cuda.empty_cache()
    rows.save()


if __name__ == "__main__":
    main()
