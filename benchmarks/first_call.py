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
import threading
import time


class StackSampler:
    """Samples every thread's Python stack every few milliseconds (an autograd engine thread included, which
    cProfile would not see); `top()` lists the most frequent innermost frames with their callers."""

    def __init__(self, interval_s: float = 0.005, depth: int = 7):
        self.interval_s, self.depth, self.counts, self.samples = interval_s, depth, {}, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack, importing = [], False
                while frame is not None and len(stack) < self.depth:
                    code = frame.f_code
                    if code.co_filename.startswith("<frozen importlib"):  # show who imports, not how
                        importing = True
                    else:
                        stack.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}")
                    frame = frame.f_back
                stack = ["(importing)"] * importing + stack
                key = " < ".join(stack)
                self.counts[key] = self.counts.get(key, 0) + 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def top(self, n: int = 12) -> list:
        ranked = sorted(self.counts.items(), key=lambda kv: -kv[1])[:n]
        return [(round(count * self.interval_s, 3), stack) for stack, count in ranked]


def child(serial: bool, sample: bool = False) -> None:
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
    events = []  # (what, start, seconds) after the block's first call began

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
                if t_block:
                    events.append((what, round(t - t_block, 3), round(time.perf_counter() - t, 3)))

        setattr(owner, name, wrapper)

    timed(parallel_compile, "precompile", "first-call dry runs + children")
    timed(parallel_compile, "compile_in_children", "children (kernels)", count=lambda requests, *a, **k: len(requests))
    timed(triton.compiler, "compile", "triton.compile in the parent")
    timed(triton.compiler.CompiledKernel, "_init_handles", "first launches (launcher + load)")
    timed(parallel_compile, "_in_disk_cache", "disk-cache lookups before forking")
    timed(torch.func, "functional_call", "layer dry-run forward")
    timed(torch.autograd, "grad", "layer dry-run backward")
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
    events.clear()
    sampler = StackSampler()
    if sample:
        sampler.__enter__()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = block(x)
    y.float().sum().backward()
    torch.cuda.synchronize()
    t_block = time.perf_counter() - t_block
    if sample:
        sampler.__exit__()
    # the first call (after its dry run) must give what a later call gives, bit for bit
    first = [y.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    x.grad = None
    block.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = block(x)
    y.float().sum().backward()
    again = [y.detach(), x.grad] + [p.grad for p in block.parameters()]
    same = all(torch.equal(a, b) for a, b in zip(first, again))
    print(json.dumps(dict(import_s=t_import, cuda_s=t_cuda, cublas_s=t_cublas, block_s=t_block,
                          compiles=compiles, spent=spent, events=events, stacks=sampler.top(), same=same)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=["parallel", "serial"])
    p.add_argument("--sample", action="store_true", help="sample the Python stacks of every thread (about 5 ms)")
    a = p.parse_args()
    if a.child:
        child(a.child == "serial", a.sample)
        return
    print("| run | import s | CUDA start s | first matmul s | block fwd+bwd s | kernels loaded | = second call |")
    print("|---|---|---|---|---|---|---|")
    details = []
    for _ in range(a.repeats):
        parallel_cache = tempfile.mkdtemp(prefix="mambakit-first-call-")
        runs = [("cold, first-call kernels compiled in parallel processes", "parallel", parallel_cache),
                ("warm cache (same process start, kernels loaded from disk)", "parallel", parallel_cache),
                ("cold, compiled one after the other", "serial", tempfile.mkdtemp(prefix="mambakit-first-call-"))]
        for label, mode, cache in runs:
            env = dict(os.environ, TRITON_CACHE_DIR=cache)
            env.pop("TRITON_INTERPRET", None)
            run = subprocess.run([sys.executable, __file__, "--child", mode] + ["--sample"] * a.sample, env=env,
                                 capture_output=True, text=True)
            if run.returncode != 0:
                print(f"| {label} | failed (exit {run.returncode}): {(run.stdout + run.stderr)[-600:]} |")
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"| {label} | {r['import_s']:.2f} | {r['cuda_s']:.2f} | {r['cublas_s']:.2f} | "
                  f"**{r['block_s']:.2f}** | {len(r['compiles'])} | {r['same']} |")
            details.append((label, r["compiles"], r["spent"], r["events"], r["stacks"]))
    for label, compiles, spent, events, stacks in details:
        print(f"\n{label}: kernel, seconds into the block's first call when it was ready")
        for name, at in compiles:
            print(f"  {name:32s} {at:6.2f}")
        print("  where the time went (calls, s; nested: the first launches include the launcher builds):")
        for what, (calls, seconds) in spent.items():
            print(f"    {what:40s} {calls:4d} {seconds:7.2f}")
        print("  timeline (start s, seconds):")
        for what, start, seconds in sorted(events, key=lambda e: e[1]):
            if seconds >= 0.05:
                print(f"    {start:7.2f} {seconds:7.2f}  {what}")
        if stacks:
            print("  most sampled stacks (seconds, innermost first):")
            for seconds, stack in stacks:
                print(f"    {seconds:6.2f}  {stack}")


if __name__ == "__main__":
    main()
