"""Host (CPU) time of the training step's pieces on a GPU: what the Python side, the launches and the torch ops cost
while the GPU waits (a step whose host time exceeds its kernel time is launch-bound).

    PYTHONUNBUFFERED=1 python3 benchmarks/host_overhead.py [--arch mamba2|mamba1|mamba3] [--top 30]

Host time = from the call until Python returns, the GPU synchronised before each call (so the launch queue is empty
and nothing blocks on it). Rows: one Triton launch of a no-op kernel with 24 arguments, torch.empty, a small
torch.sum, one mixer block forward and forward+backward (bf16 autocast, 8 x 2048, the 130M width), each with its
kernel count; then cProfile of the block's forward+backward by cumulative time (mambakit and triton functions), and
the torch profiler's CPU table by self time.

    python3 benchmarks/host_overhead.py --count-ops [--tiny]

Counts instead (the CPU, TRITON_INTERPRET=1): the torch ops dispatched and the Triton launches of one forward and
one backward of the fused Mamba-2 inner path (`mambakit.ops.mamba2_inner.fused`) and of the Mamba-1 one
(`mambakit.ops.mamba_inner.fused`), float32 and bf16 autocast (bf16 in_proj output, float32 weights); rows to
$OUT/op_count.jsonl. The counts do not depend on the sizes (except through the branches the sizes pick: the shapes
keep those of the 130M GPU step: the fused state pass, heads split in the dB/dC kernel).

    python3 benchmarks/host_overhead.py --count-ops --scope block step [--tiny] [--arch mamba2 mamba1 mamba3]

The same counts (plus autograd nodes, GPU kernels and the host microseconds of the call) of one whole LM block
(residual add + RMSNorm + mixer, forward + backward, as the second block of a stack sees it: a float32 residual
and a bf16 hidden in) and of one tiny LM training step (2 layers: embedding, blocks, final norm, tied head, float32
cross-entropy, backward; no optimizer), Mamba-2 and Mamba-1, under CPU bf16 autocast with the CUDA paths forced
(the fused inner op, the Triton add + norm, the autocast dtype out of the norm) and the Triton launches counted
but skipped (measurement only: the outputs are garbage, the counts are those of the GPU step). kernels: the GPU kernels
those ops make (Triton launches + the torch ops that are not views, allocations or metadata; a cuBLAS product may
be more than one). host_us: the least microseconds of 20 calls so measured (CPU torch ops at tiny sizes + Python,
no launch cost; noisy on a shared machine), a rough proxy of the Python side. `--arch mamba3` (block scope only): the
same LM block around a Mamba-3 SISO mixer, its scan on the CUDA path (the SSD form with its Triton kernels, the
B / C RMSNorm's Triton kernel).

    python3 benchmarks/host_overhead.py --count-ops --scope decode [--tree DIR]

The same counts of one decoding step of one LM block (residual add + RMSNorm + the mixer's step, no autograd, a
float32 residual and a bf16 hidden in, bf16 weights) for Mamba-3 (SISO; with is_outproj_norm) and Mamba-2, batch 1
and 16, on the CUDA paths forced (`decode_paths`: the Triton norms, the GEMV kernels where the batch allows them,
the fused step kernels; the CPU's float32 product paths off), launches counted but skipped. --tree DIR: import
mambakit from DIR instead (an older checkout, e.g. `git archive main`: the counts before a change).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import sys
import time

COUNT_OPS = "--count-ops" in sys.argv
if COUNT_OPS:  # the kernels interpreted on the CPU (set before triton is imported)
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--tree" in sys.argv:  # an older mambakit package ahead of this checkout's
    sys.path.insert(0, os.path.abspath(sys.argv[sys.argv.index("--tree") + 1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from _common import Rows, device_line, sync, table  # noqa: E402


@triton.jit
def _noop(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11,
          FLAG: tl.constexpr):
    if FLAG:
        tl.store(p0 + i0, tl.load(p1 + i1))


def host_us(fn, repeats: int = 30) -> float:
    """Median host microseconds of fn(), the GPU idle at each start."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    sync()
    return statistics.median(times)


def kernels_of(fn) -> tuple[int, float]:
    """(kernel launches, kernel ms) of one call of fn."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    ev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return len(ev), sum(e.device_time_total for e in ev) / 1e3


def block(arch: str):
    if arch == "mamba3":
        from mambakit.layers.mamba3 import Mamba3
        return Mamba3(768, d_state=128, headdim=64, device="cuda")
    if arch == "mamba2":
        from mambakit.layers.mamba2 import Mamba2
        return Mamba2(768, d_state=128, headdim=64, device="cuda")
    from mambakit.layers.mamba import Mamba
    return Mamba(768, device="cuda")


def _inner_inputs(arch: str, dtype: torch.dtype, tiny: bool):
    """(op, leaves, kwargs) of one fused inner-path call on the CPU: the in_proj output in dtype, float32
    weights (what bf16 autocast over float32 weights gives)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=0.5, dt=torch.float32):
        return (torch.randn(*shape, generator=g) * scale).to(dt).requires_grad_()

    batch, seqlen = (1, 32) if tiny else (2, 128)
    if arch == "mamba2":
        from mambakit.ops.mamba2_inner import mamba2_inner
        nheads, headdim, ngroups, d_state, d_model = (4, 4, 1, 8, 8) if tiny else (8, 8, 1, 16, 32)
        d_inner = nheads * headdim
        conv_dim = d_inner + 2 * ngroups * d_state
        zxbcdt = r(batch, seqlen, d_inner + conv_dim + nheads, dt=dtype)
        kw = dict(conv_weight=r(conv_dim, 4), conv_bias=r(conv_dim), dt_bias=r(nheads),
                  A=(-torch.rand(nheads, generator=g) - 0.3).requires_grad_(), D=r(nheads),
                  norm_weight=r(d_inner), out_weight=r(d_model, d_inner), out_bias=None,
                  headdim=headdim, ngroups=ngroups, chunk_size=16 if tiny else 64, backend="triton")
        return mamba2_inner, (zxbcdt,), kw
    from mambakit.ops.mamba_inner import mamba_inner
    d_inner, d_state, rank, d_model = (8, 4, 2, 8) if tiny else (32, 16, 4, 16)
    xz = r(batch, seqlen, 2 * d_inner, dt=dtype)
    kw = dict(conv1d_weight=r(d_inner, 4), conv1d_bias=r(d_inner), x_proj_weight=r(rank + 2 * d_state, d_inner),
              delta_proj_weight=r(d_inner, rank), out_proj_weight=r(d_model, d_inner), out_proj_bias=None,
              A=(-torch.rand(d_inner, d_state, generator=g) - 0.2).requires_grad_(), D=r(d_inner),
              delta_bias=r(d_inner), backend="triton")
    return (lambda xz, **k: mamba_inner(xz.transpose(1, 2), **k)), (xz,), kw


def count_ops(arch: str, dtype: torch.dtype, tiny: bool = False) -> dict:
    """Torch ops and Triton launches of one forward and one backward of the fused inner path (the second call:
    the first one's one-time work not counted)."""
    from _op_count import OpCounter

    op, leaves, kw = _inner_inputs(arch, dtype, tiny)
    counts = {}
    for attempt in range(2):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
        with OpCounter() as fwd, ctx:
            out = op(*leaves, **kw)
        g = torch.randn_like(out)
        for t in list(leaves) + [v for v in kw.values() if isinstance(v, torch.Tensor)]:
            t.grad = None  # so that the leaves' gradients are stored, not accumulated (as after zero_grad)
        with OpCounter() as bwd:
            out.backward(g)
        counts = dict(arch=arch, dtype=str(dtype).replace("torch.", ""), fwd_torch=fwd.torch_ops,
                      fwd_triton=fwd.launches, bwd_torch=bwd.torch_ops, bwd_triton=bwd.launches,
                      total=fwd.torch_ops + fwd.launches + bwd.torch_ops + bwd.launches,
                      kernels=fwd.kernel_ops + bwd.kernel_ops)
        counts["_fwd"], counts["_bwd"] = fwd.table(), bwd.table()
    return counts


@contextlib.contextmanager
def cuda_paths():
    """Measurement only: the CPU takes the paths a CUDA training step takes (the fused Mamba-2 inner op, the Triton
    add + RMSNorm, the autocast dtype handed from the norm to in_proj). Mamba-1 picks its fused op through
    scan_backend="triton"."""
    import mambakit.layers.norm as layer_norm
    import mambakit.models.lm as lm
    import mambakit.ops.mamba3 as mamba3_ops
    import mambakit.ops.norm as norm
    from mambakit.layers.mamba2 import Mamba2

    saved = [(Mamba2, "_fused_inner_ok", Mamba2._fused_inner_ok), (norm, "use_triton", norm.use_triton),
             (lm, "_normed_dtype", lm._normed_dtype), (mamba3_ops, "ssd_form_fits", mamba3_ops.ssd_form_fits),
             (layer_norm, "_use_triton", layer_norm._use_triton)]
    Mamba2._fused_inner_ok = lambda self, hidden_states, dt_transform: True
    norm.use_triton = lambda x, weight, z=None: True
    layer_norm._use_triton = lambda x, weight, z=None: True
    mamba3_ops.ssd_form_fits = lambda device, dtype: dtype != torch.float64
    lm._normed_dtype = lambda hidden, step: torch.bfloat16 if torch.is_autocast_enabled("cpu") and not step else None
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _lm_config(arch: str, n_layer: int):
    from mambakit.models.config import MambaConfig

    if arch == "mamba2":  # the inner count's non-tiny shapes: 8 heads of 8, d_state 16, chunk 64
        ssm = dict(layer="Mamba2", d_state=16, headdim=8, chunk_size=64)
    elif arch == "mamba3":  # 8 heads of 8, d_state 16 (4 angles)
        ssm = dict(layer="Mamba3", d_state=16, headdim=8, chunk_size=64)
    else:
        ssm = dict(layer="Mamba1", d_state=16, dt_rank=4, scan_backend="triton")
    return MambaConfig(d_model=32, n_layer=n_layer, vocab_size=64, ssm_cfg=ssm)


def count_scope(arch: str, scope: str, repeats: int = 20) -> dict:
    """Torch ops, Triton launches (skipped) and autograd nodes of one block's or one LM step's forward + backward
    on the CUDA paths (`cuda_paths`), bf16 CPU autocast; the second call counted; host_us: the least of repeats
    calls with the launches skipped, uncounted (the machine is shared)."""
    from _op_count import OpCounter, autograd_nodes, launches_skipped
    import torch.nn.functional as F
    from mambakit.models.lm import Block, MambaLMHeadModel

    g = torch.Generator().manual_seed(0)
    batch, seqlen = 2, 128
    if scope == "block":
        model = Block(_lm_config(arch, 2), layer_idx=1)
        hidden = torch.randn(batch, seqlen, 32, generator=g).to(torch.bfloat16).requires_grad_()
        residual = torch.randn(batch, seqlen, 32, generator=g).requires_grad_()
        grads = (torch.randn(batch, seqlen, 32, generator=g).to(torch.bfloat16),
                 torch.randn(batch, seqlen, 32, generator=g))

        model_inputs = (hidden, residual)

        def forward():
            return model(hidden, residual)

        def backward(outs):
            torch.autograd.backward(outs, grads)
    else:
        model = MambaLMHeadModel(_lm_config(arch, 2))
        ids = torch.randint(0, 64, (batch, seqlen + 1), generator=g)
        model_inputs = ()

        def forward():
            logits = model(ids[:, :-1]).logits
            return (F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()),)

        def backward(outs):
            outs[0].backward()
    counts = {}
    with cuda_paths():
        for _ in range(2):  # the second call counted (the first one's one-time work not)
            model.zero_grad(set_to_none=True)
            for t in model_inputs:
                t.grad = None
            with OpCounter(skip_launches=True) as fwd, torch.autocast("cpu", dtype=torch.bfloat16):
                outs = forward()
            nodes = autograd_nodes(*outs)
            with OpCounter(skip_launches=True) as bwd:
                backward(outs)
            counts = dict(arch=arch, scope=scope, dtype="bfloat16", fwd_torch=fwd.torch_ops, fwd_triton=fwd.launches,
                          bwd_torch=bwd.torch_ops, bwd_triton=bwd.launches, autograd_nodes=nodes,
                          total=fwd.torch_ops + fwd.launches + bwd.torch_ops + bwd.launches,
                          kernels=fwd.kernel_ops + bwd.kernel_ops)
            counts["_fwd"], counts["_bwd"] = fwd.table(), bwd.table()
        times = []
        # the skipped launches leave torch.empty's garbage, whose denormals would make the CPU products slow
        torch.set_flush_denormal(True)
        with launches_skipped():
            for _ in range(repeats):
                model.zero_grad(set_to_none=True)
                for t in model_inputs:
                    t.grad = None
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    outs = forward()
                backward(outs)
                times.append((time.perf_counter() - t0) * 1e6)
        torch.set_flush_denormal(False)
    counts["host_us"] = round(min(times), 1)
    return counts


@contextlib.contextmanager
def decode_paths():
    """Measurement only: a CPU decode step takes the paths of a CUDA one (the Triton norms, the GEMV kernels up to
    GEMV_MAX_BATCH rows, the fused Mamba-2 / Mamba-3 step kernels; not the CPU's float32 products of 16-bit
    weights). Names a tree lacks (an older checkout) are left alone."""
    import functools

    import mambakit.layers.mamba2 as m2
    import mambakit.layers.mamba3 as m3
    import mambakit.layers.norm as layer_norm
    import mambakit.layers.step as step
    import mambakit.ops.mixer_step as mixer_step
    import mambakit.ops.norm as norm
    import mambakit.ops.norm_linear as norm_linear

    def gemv_rows(x, weight, *others, product_dtype=None):
        return x.numel() // max(x.shape[-1], 1) <= norm_linear.GEMV_MAX_BATCH

    patches = [(norm, "use_triton", lambda x, weight, z=None: True),
               (layer_norm, "_use_triton", lambda x, weight, z=None: True), (norm_linear, "use_gemv", gemv_rows),
               (step, "use_cpu_linear", lambda x, weight: False), (mixer_step, "use_cpu_linear", lambda x, w: False),
               (m3, "use_cpu_linear", lambda x, weight: False), (m3, "prep_step_fits", lambda *a, **k: True),
               (m3, "mamba3_step", functools.partial(m3.mamba3_step, backend="triton")),
               (m2, "mamba2_step", functools.partial(m2.mamba2_step, backend="triton"))]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches if hasattr(owner, name)]
    for owner, name, value in patches:
        if hasattr(owner, name):
            setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


DECODE_ARCHS = {"mamba3": dict(layer="Mamba3", d_state=16, headdim=8, chunk_size=16),
                "mamba3_outproj_norm": dict(layer="Mamba3", d_state=16, headdim=8, chunk_size=16,
                                            is_outproj_norm=True),
                "mamba2": dict(layer="Mamba2", d_state=16, headdim=8, chunk_size=16)}


def count_decode(arch: str, batch: int, repeats: int = 20) -> dict:
    """Torch ops, Triton launches (skipped) and kernels of one block's decoding step (`decode_paths`), the second
    call counted; host_us: the least of repeats calls with the launches skipped."""
    from _op_count import OpCounter, launches_skipped
    from mambakit.models.config import MambaConfig
    from mambakit.models.lm import Block

    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg=dict(DECODE_ARCHS[arch]))
    block = Block(config, layer_idx=1).to(torch.bfloat16).eval()
    state = block.mixer.allocate_state(batch)
    hidden = torch.randn(batch, 1, 32).to(torch.bfloat16)
    residual = torch.randn(batch, 1, 32)
    with torch.no_grad(), decode_paths():
        for _ in range(2):
            with OpCounter(skip_launches=True) as c:
                block(hidden, residual, state=state, step=True)
        times = []
        with launches_skipped():
            for _ in range(repeats):
                t0 = time.perf_counter()
                block(hidden, residual, state=state, step=True)
                times.append((time.perf_counter() - t0) * 1e6)
    return dict(scope="decode", arch=arch, batch=batch, dtype="bfloat16", fwd_torch=c.torch_ops,
                fwd_triton=c.launches, total=c.torch_ops + c.launches, kernels=c.kernel_ops,
                host_us=round(min(times), 1), _fwd=c.table(), _bwd="")


def count_main(tiny: bool, verbose: bool, scopes: list, archs: list) -> None:
    rows = Rows("op_count")
    for scope in scopes:
        if scope == "decode":
            for arch in DECODE_ARCHS:
                for batch in (1, 16):
                    c = count_decode(arch, batch)
                    fwd = c.pop("_fwd")
                    c.pop("_bwd")
                    rows.add(**c)
                    if verbose:
                        print(f"# decode {arch} batch {batch}\n{fwd}")
            continue
        for arch in archs:
            if arch == "mamba3" and scope != "block":
                continue  # Mamba-3 has no fused inner op; its step scope is not counted
            for dtype in ((torch.float32, torch.bfloat16) if scope == "inner" else (torch.bfloat16,)):
                c = count_ops(arch, dtype, tiny) if scope == "inner" else count_scope(arch, scope)
                c.setdefault("scope", scope)
                fwd, bwd = c.pop("_fwd"), c.pop("_bwd")
                rows.add(**c)
                if verbose:
                    print(f"# {scope} {arch} {dtype} forward\n{fwd}\n# backward\n{bwd}")
    rows.save()
    print(table(rows.rows, ["scope", "arch", "batch", "dtype", "fwd_torch", "fwd_triton", "bwd_torch", "bwd_triton",
                            "total", "kernels", "autograd_nodes", "host_us"]))


def main() -> None:
    if COUNT_OPS:
        ap = argparse.ArgumentParser()
        ap.add_argument("--count-ops", action="store_true")
        ap.add_argument("--tiny", action="store_true", help="smaller shapes (the test's)")
        ap.add_argument("--verbose", action="store_true", help="the counts by op name")
        ap.add_argument("--scope", nargs="+", default=["inner"], choices=["inner", "block", "step", "decode"],
                        help="what is counted: the fused inner op (launches run), a whole block, a tiny LM step, "
                             "one block's decoding step")
        ap.add_argument("--tree", help="import mambakit from this directory (an older checkout)")
        ap.add_argument("--arch", nargs="+", default=["mamba2", "mamba1"], choices=["mamba2", "mamba1", "mamba3"],
                        help="the mixers counted by the inner / block / step scopes (mamba3: block scope only)")
        args = ap.parse_args()
        count_main(args.tiny, args.verbose, args.scope, args.arch)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="mamba2", choices=["mamba1", "mamba2", "mamba3"])
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    args = ap.parse_args()
    print(f"# {device_line()}")
    rows = Rows("host_overhead")
    a = torch.zeros(16, device="cuda")
    ints = [16] * 12
    rows.add(piece="triton no-op launch (24 args)",
             host_us=host_us(lambda: _noop[(1,)](*([a] * 12), *ints, FLAG=False)))
    rows.add(piece="torch.empty (8, 2048, 1536) bf16",
             host_us=host_us(lambda: torch.empty(8, 2048, 1536, device="cuda", dtype=torch.bfloat16)))
    s = torch.randn(8, 24, 16, device="cuda")
    rows.add(piece="torch.sum of (8, 24, 16) over dim 0", host_us=host_us(lambda: s.sum(0)))
    w = torch.randn(64, 64, device="cuda")
    rows.add(piece="fp32 -> bf16 cast of a (64, 64) weight", host_us=host_us(lambda: w.to(torch.bfloat16)))
    m = block(args.arch)
    x = torch.randn(args.batch, args.seqlen, 768, device="cuda", requires_grad=True)
    g = torch.randn_like(x)

    def fwd():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            m(x)

    def fwd_bwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
        out.backward(g)
        m.zero_grad(set_to_none=True)
        x.grad = None

    for name, fn in ((f"{args.arch} block forward (no grad)", fwd), (f"{args.arch} block forward+backward", fwd_bwd)):
        n, kms = kernels_of(fn)
        rows.add(piece=name, host_us=host_us(fn, repeats=10), kernels=n, kernel_ms=kms)
    rows.save()
    print(table(rows.rows, ["piece", "host_us", "kernels", "kernel_ms"]))

    prof = cProfile.Profile()
    fwd_bwd()
    sync()
    prof.enable()
    for _ in range(3):
        fwd_bwd()
    sync()
    prof.disable()
    print("# cProfile of 3 block forward+backward calls, by cumulative time")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(r"mambakit|triton/runtime", args.top)

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3):
            fwd_bwd()
        sync()
    print("# torch profiler, CPU, 3 block forward+backward calls, by self CPU time")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
