"""Where the first forward+backward of a Mamba2 block spends its time on the GPU (cold Triton cache).

    PYTHONUNBUFFERED=1 python3 benchmarks/first_call.py [--repeats 2]     (GPU)

Each measurement runs in a fresh process with its own empty Triton cache:
- ``block``: CUDA start, the first bf16 matmul forward+backward (cuBLAS start-up), then the Mamba2 block's first
  forward+backward under bf16 autocast (d_model 768, d_state 128, batch 2 x 2048), with the kernels of each op's first
  call compiled side by side in forked processes (the default, `mambakit.ops.triton.compile`) or one after the
  other on first launch, as Triton does by itself;
- a warm run (same cache, new process): what is left when nothing is compiled;
- when each kernel became ready in the parent (compiled or loaded from the disk cache);
- where the parent's time went: dry runs, waiting for the children (and how many), `triton.compile` in the parent
  (a compile, or a load from the disk cache), first launches (building the launcher, loading onto the GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(serial: bool) -> None:
    t_block = 0.0
    t0 = time.perf_counter()
    import torch
    import triton

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mambakit.layers.mamba2 import Mamba2
    from mambakit.ops.triton import compile as parallel_compile

    compiles = []  # (kernel, seconds after the block's first call began when its compile ended)
    compiled_init = triton.compiler.CompiledKernel.__init__

    def noted_init(self, *args, **kwargs):
        compiled_init(self, *args, **kwargs)
        compiles.append((getattr(self, "name", "?"), round(time.perf_counter() - t_block, 2)))

    triton.compiler.CompiledKernel.__init__ = noted_init
    parallel_compile.ENABLED = not serial
    spent = {}  # what -> [calls, seconds]

    def timed(owner, name, what, count=lambda *a, **k: 1):
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                entry = spent.setdefault(what, [0, 0.0])
                entry[0] += count(*args, **kwargs)
                entry[1] += time.perf_counter() - t

        setattr(owner, name, wrapper)

    timed(parallel_compile, "precompile", "first-call dry runs + children")
    timed(parallel_compile, "compile_in_children", "children (kernels)", count=lambda requests, *a, **k: len(requests))
    timed(triton.compiler, "compile", "triton.compile in the parent")
    timed(triton.compiler.CompiledKernel, "_init_handles", "first launches (launcher + load)")
    t_import = time.perf_counter() - t0

    t0 = time.perf_counter()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    t_cuda = time.perf_counter() - t0
    timed(triton.runtime.driver.active.launcher_cls, "__init__", "launcher builds")

    t0 = time.perf_counter()
    a = torch.randn(256, 768, device="cuda", requires_grad=True)
    w = torch.randn(768, 768, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = a @ w
    out.float().sum().backward()
    torch.cuda.synchronize()
    t_cublas = time.perf_counter() - t0

    torch.manual_seed(0)
    block = Mamba2(d_model=768, d_state=128, headdim=64, device="cuda")
    x = torch.randn(2, 2048, 768, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    t_block = time.perf_counter()
    compiles.clear()
    spent.clear()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = block(x)
    y.float().sum().backward()
    torch.cuda.synchronize()
    t_block = time.perf_counter() - t_block
    print(json.dumps(dict(import_s=t_import, cuda_s=t_cuda, cublas_s=t_cublas, block_s=t_block,
                          compiles=compiles, spent=spent)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=["parallel", "serial"])
    a = p.parse_args()
    if a.child:
        child(a.child == "serial")
        return
    print("| run | import s | CUDA start s | first matmul s | block fwd+bwd s | kernels loaded |")
    print("|---|---|---|---|---|---|")
    details = []
    for _ in range(a.repeats):
        parallel_cache = tempfile.mkdtemp(prefix="mambakit-first-call-")
        runs = [("cold, first-call kernels compiled in parallel processes", "parallel", parallel_cache),
                ("warm cache (same process start, kernels loaded from disk)", "parallel", parallel_cache),
                ("cold, compiled one after the other", "serial", tempfile.mkdtemp(prefix="mambakit-first-call-"))]
        for label, mode, cache in runs:
            env = dict(os.environ, TRITON_CACHE_DIR=cache)
            env.pop("TRITON_INTERPRET", None)
            run = subprocess.run([sys.executable, __file__, "--child", mode], env=env, capture_output=True,
                                 text=True)
            if run.returncode != 0:
                print(f"| {label} | failed: {run.stderr[-400:]} |")
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"| {label} | {r['import_s']:.2f} | {r['cuda_s']:.2f} | {r['cublas_s']:.2f} | "
                  f"**{r['block_s']:.2f}** | {len(r['compiles'])} |")
            details.append((label, r["compiles"], r["spent"]))
    for label, compiles, spent in details:
        print(f"\n{label}: kernel, seconds into the block's first call when it was ready")
        for name, at in compiles:
            print(f"  {name:32s} {at:6.2f}")
        print("  where the time went (calls, s; nested: the first launches include the launcher builds):")
        for what, (calls, seconds) in spent.items():
            print(f"    {what:40s} {calls:4d} {seconds:7.2f}")


if __name__ == "__main__":
    main()
