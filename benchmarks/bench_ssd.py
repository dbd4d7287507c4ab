"""Mamba-2 SSD on the GPU: the Triton kernels checked against float64, then timed against attention and Mamba-1.

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_ssd.py [--quick] [--seqlens 512 1024 ...] [--log FILE]

1. First-call latency of a Mamba2 block's forward+backward (cold, private Triton cache).
2. Correctness (large awkward shapes, seq_idx, initial state, D, z): fp32 <= 1e-5 and bf16/fp16 <= 1e-2 relative
   error against the chunked PyTorch form in float64 on the GPU (fed the same inputs and the same upstream
   gradient, rounded to the output dtype), forward and every gradient; bit-identical
   gradients run after run; the decode-step kernel against PyTorch.
3. Speed, bf16, nheads 32 x headdim 64, ngroups 1, batch * seqlen = 65536 tokens (the issue's reference setting):
   our Triton SSD (d_state 64 and 128) forward and forward+backward; PyTorch SDPA (causal, flash backend) with the
   same batch and 32 heads x 64; our Mamba-1 fused scan at the same width (dim 2048, d_state 16); achieved TFLOP/s
   of the SSD matmul parts against a bf16 matmul timed in the same run; the official mamba_ssm 2.3.2 times given
   in the issue as a fixed reference column; fla-core's chunk_simple_gla (the same problem as q = C, k = B,
   v = dt x, g = dt A) when fla is importable.
Times are medians of triton.testing.do_bench (CUDA events, L2 flushed). Exit code 1 if a check fails.
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
import torch.nn.functional as F  # noqa: E402

from _common import first_call_s, gpu_ms, rel_err, report  # noqa: E402

log, check = report.log, report.check

# official mamba_ssm 2.3.2 Triton SSD on an H100 (issue 6), bf16, 32 x 64, 65536 tokens: (fwd, fwd+bwd) ms
OFFICIAL = {64: (1.05, 4.96), 128: (1.43, 6.30)}


def ssd_inputs(batch, seqlen, nheads, headdim, ngroups, d_state, dtype, seed=0, packed=False, init=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"

    def r(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)

    kw = dict(x=r(batch, seqlen, nheads, headdim), dt=r(batch, seqlen, nheads, dt=torch.float32),
              A=-torch.exp(torch.rand(nheads, generator=g, device=dev) * 2.7),
              B=r(batch, seqlen, ngroups, d_state), C=r(batch, seqlen, ngroups, d_state),
              D=r(nheads, dt=torch.float32), z=r(batch, seqlen, nheads, headdim),
              dt_bias=r(nheads, dt=torch.float32, scale=0.5) - 3.0, dt_softplus=True, chunk_size=256)
    if init:
        kw["initial_states"] = r(batch, nheads, headdim, d_state, dt=torch.float32)
    if packed:
        cuts = torch.sort(torch.randint(1, seqlen, (batch, 3), generator=g, device=dev), dim=1).values
        pos = torch.arange(seqlen, device=dev)
        kw["seq_idx"] = (pos[None, :, None] >= cuts[:, None, :]).sum(-1).to(torch.int32)
    return kw


FLOAT_ARGS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def grads_of(kw, backend, gy, gf):
    from mambakit.ops.ssd import mamba_chunk_scan_combined

    leaves = {k: kw[k].detach().clone().requires_grad_() for k in FLOAT_ARGS if k in kw}
    args = dict(kw, **leaves)
    y, final = mamba_chunk_scan_combined(**args, return_final_states=True, backend=backend)
    loss = (y.double() * gy).sum() + (final.double() * gf).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, final, dict(zip(leaves, grads))


def correctness(quick: bool) -> None:
    log("## correctness against float64 (chunked PyTorch form on the GPU)")
    shapes = [(2, 1000, 8, 64, 2, 128, True), (1, 777, 4, 48, 1, 64, False), (3, 300, 6, 32, 3, 16, True),
              (1, 200, 2, 64, 1, 256, False)]
    if quick:
        shapes = shapes[:2]
    for batch, L, h, p, g, n, packed in shapes:
        kw64 = ssd_inputs(batch, L, h, p, g, n, torch.float64, packed=packed)
        kw64["A"] = kw64["A"].double()
        gen = torch.Generator(device="cuda").manual_seed(1)
        gy = torch.randn(batch, L, h, p, generator=gen, device="cuda", dtype=torch.float64)
        gf = torch.randn(batch, h, p, n, generator=gen, device="cuda", dtype=torch.float64)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)):
            # y comes out in `dtype`, so its incoming gradient is rounded to `dtype` too: give the float64
            # reference the same rounded gradient (any bf16 model sees it; dA, a sum of terms of both signs over
            # the whole sequence, is the gradient most sensitive to it)
            kw = {k: (v.to(dtype) if k in ("x", "B", "C", "z") else
                      v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in kw64.items()}
            # the reference gets the very inputs the kernels get (rounded to `dtype`), so that what is measured is
            # the kernels' error, not the rounding of the inputs (dA, a sum of terms of both signs over the whole
            # sequence, amplifies the latter)
            same = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                    for k, v in kw.items()}
            yr, fr, gr = grads_of(same, "torch", gy.to(dtype).double(), gf)
            log(f"  batch {batch} seqlen {L} heads {h} headdim {p} groups {g} d_state {n} packed {packed} "
                f"{str(dtype)[6:]}")
            y, f, gt = grads_of(kw, "triton", gy, gf)
            check("y", rel_err(y, yr), tol)
            check("final state", rel_err(f, fr), tol)
            for k in gr:
                check(f"d{k}", rel_err(gt[k], gr[k]), tol)
            if dtype == torch.bfloat16:
                again = grads_of(kw, "triton", gy, gf)[2]
                same = all(torch.equal(gt[k], again[k]) for k in gt)
                log(f"    gradients bit-identical across runs: {same}")
                if not same:
                    report.fail("non-deterministic gradients")
    log("  decode step (Triton vs PyTorch, 3 steps)")
    from mambakit.ops.ssd import ssd_step

    kw = ssd_inputs(4, 1, 24, 64, 1, 128, torch.float32)
    state = torch.randn(4, 24, 64, 128, device="cuda")
    s1, s2 = state.clone(), state.clone()
    for _ in range(3):
        args = (kw["x"][:, 0], kw["dt"][:, 0], kw["A"], kw["B"][:, 0], kw["C"][:, 0])
        opt = dict(D=kw["D"], z=kw["z"][:, 0], dt_bias=kw["dt_bias"], dt_softplus=True)
        y1 = ssd_step(s1, *args, backend="torch", **opt)
        y2 = ssd_step(s2, *args, backend="triton", **opt)
    check("decode y", rel_err(y2, y1), 1e-5)
    check("decode state", rel_err(s2, s1), 1e-5)


def first_call_latency() -> None:
    from mambakit.layers.mamba2 import Mamba2

    torch.manual_seed(0)
    block = Mamba2(d_model=768, d_state=128, headdim=64, device="cuda")
    x = torch.randn(2, 2048, 768, device="cuda", requires_grad=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block(x)
        y.float().sum().backward()

    log(f"## first call: Mamba2 block (d_model 768, d_state 128) forward+backward, cold Triton cache: "
        f"{first_call_s(step):.2f} s")


def bench_ms(fn, rep=200, grad_to_none=None) -> float:
    return gpu_ms(fn, warmup=25, rep=rep, grad_to_none=grad_to_none)


def time_ssd(batch, L, d_state, backend="triton"):
    from mambakit.ops.ssd import mamba_chunk_scan_combined

    kw = ssd_inputs(batch, L, 32, 64, 1, d_state, torch.bfloat16, init=False)
    kw.pop("z")
    leaves = {k: kw[k].detach().requires_grad_() for k in ("x", "dt", "B", "C")}
    args = dict(kw, **leaves)
    fwd = bench_ms(lambda: mamba_chunk_scan_combined(**args, backend=backend))
    gy = torch.randn_like(kw["x"])

    def fb():
        mamba_chunk_scan_combined(**args, backend=backend).backward(gy)

    return fwd, bench_ms(fb, grad_to_none=list(leaves.values()))


def fla_inputs(batch, L, d_state):
    """The SSD as fla's chunk_simple_gla: q = C, k = B (broadcast to the 32 heads), v = dt * x, g = dt * A (log
    decay), scale 1; dt already processed. Prepared outside the timed call (fla gets the easier job)."""
    kw = ssd_inputs(batch, L, 32, 64, 1, d_state, torch.bfloat16, init=False)
    dt = F.softplus(kw["dt"] + kw["dt_bias"])
    q = kw["C"].expand(batch, L, 32, d_state).contiguous()
    k = kw["B"].expand(batch, L, 32, d_state).contiguous()
    v = (kw["x"].float() * dt[..., None]).to(torch.bfloat16)
    g = (dt * kw["A"]).float()
    return kw, q, k, v, g


def time_fla(batch, L, d_state):
    """(fwd, fwd+bwd) ms of fla-core's chunk_simple_gla, or None if fla is not installed."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    _, q, k, v, g = fla_inputs(batch, L, d_state)
    leaves = [t.requires_grad_() for t in (q, k, v, g)]
    run = lambda: chunk_simple_gla(q, k, v, g=g, scale=1.0)[0]  # noqa: E731
    gy = torch.randn_like(v)
    fwd = bench_ms(run)
    try:
        return fwd, bench_ms(lambda: run().backward(gy), grad_to_none=leaves)
    except RuntimeError as exc:  # fla refuses its gated backward on Hopper with Triton 3.4-3.7.0 (its issue #640)
        log(f"    fla backward refused: {str(exc)[:90]}")
        return fwd, float("nan")


def check_fla_equivalence() -> None:
    """fla's op on the same problem gives our y (without D): shows the comparison is like for like."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        log("## fla-core not installed: no comparison")
        return
    from mambakit.ops.ssd import mamba_chunk_scan_combined

    kw, q, k, v, g = fla_inputs(2, 1000, 64)
    kw = {key: val for key, val in kw.items() if key not in ("D", "z")}
    y = mamba_chunk_scan_combined(**{**kw, "x": kw["x"].float(), "B": kw["B"].float(), "C": kw["C"].float()},
                                  backend="torch")
    yf = chunk_simple_gla(q, k, v, g=g, scale=1.0)[0]
    log(f"## fla-core chunk_simple_gla vs our SSD (torch form, fp32) on the same problem: rel err {rel_err(yf, y):.2e}")


def time_sdpa(batch, L):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(batch, 32, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    gy = torch.randn_like(q)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fwd = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        fb = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(gy),
                      grad_to_none=[q, k, v])
    return fwd, fb


def time_mamba1(batch, L):
    from mambakit.ops.selective_scan import selective_scan_fn

    dim, N = 2048, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    u, delta, z = (torch.randn(batch, dim, L, generator=g, device="cuda").to(torch.bfloat16).requires_grad_()
                   for _ in range(3))
    B, C = (torch.randn(batch, N, L, generator=g, device="cuda").to(torch.bfloat16).requires_grad_()
            for _ in range(2))
    A = -torch.rand(dim, N, device="cuda").requires_grad_()
    D, bias = torch.randn(dim, device="cuda").requires_grad_(), torch.randn(dim, device="cuda").requires_grad_()
    run = lambda: selective_scan_fn(u, delta, A, B, C, D, z, bias, True)  # noqa: E731
    gy = torch.randn_like(u)
    return bench_ms(run), bench_ms(lambda: run().backward(gy), grad_to_none=[u, delta, z, B, C, A, D, bias])


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b, rep=100)
    return 2 * 8192**3 / ms / 1e9


def ssd_fwd_flops(tokens, d_state, nheads=32, headdim=64) -> float:
    """Matmul FLOPs of our forward (chunks of Q positions in blocks of BQ, from the kernels' plan): per head and
    position, C B^T and M X over the (NB + 1) / 2 key blocks up to its own on average, the chunk state and C H."""
    from mambakit.ops.triton.ssd import _block_len, _chunk_len

    BQ = _block_len(d_state, headdim, 256, 2)
    Q = _chunk_len(BQ, 256, 2)
    keys = (Q // BQ + 1) / 2 * BQ
    return tokens * nheads * (2 * keys * (d_state + headdim) + 4 * d_state * headdim)


def speed(seqlens, d_states, tokens) -> None:
    peak = matmul_tflops()
    log(f"\n## speed, bf16, 32 heads x 64, ngroups 1, {tokens} tokens (batch = tokens / seqlen); "
        f"bf16 matmul 8192^3: {peak:.0f} TFLOP/s")
    log("ms (ratio = other / ours: > 1 means we are faster)")
    hdr = (f"{'seqlen':>6s} {'N':>4s} {'ssd fwd':>8s} {'ssd f+b':>8s} {'TFLOP/s':>8s} {'official f/fb':>14s} "
           f"{'x off fb':>8s} {'sdpa fwd':>9s} {'sdpa f+b':>9s} {'x sdpa fb':>9s} {'mamba1 f+b':>10s} {'x m1':>6s} "
           f"{'fla f/fb':>14s} {'x fla fb':>8s}")
    log(hdr)
    cache = {}
    for L in seqlens:
        batch = max(1, tokens // L)
        if L not in cache:
            cache[L] = (time_sdpa(batch, L), time_mamba1(batch, L))
        (sf, sfb), (m1f, m1fb) = cache[L]
        for N in d_states:
            f, fb = time_ssd(batch, L, N)
            tf = ssd_fwd_flops(batch * L, N) / f / 1e9
            of, ofb = OFFICIAL[N] if N in OFFICIAL and batch * L == 65536 else (float("nan"),) * 2
            ff, ffb = time_fla(batch, L, N) or (float("nan"),) * 2
            log(f"{L:6d} {N:4d} {f:8.3f} {fb:8.3f} {tf:8.1f} {of:6.2f}/{ofb:6.2f} {ofb / fb:8.2f} {sf:9.3f} "
                f"{sfb:9.3f} {sfb / fb:9.2f} {m1fb:10.3f} {m1fb / fb:6.2f} {ff:6.3f}/{ffb:7.3f} {ffb / fb:8.2f}")
        torch.cuda.empty_cache()


def kernel_breakdown(d_state: int, L: int = 2048, tokens: int = 65536) -> None:
    """GPU time per kernel of one forward+backward (torch.profiler), to see where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    from mambakit.ops.ssd import mamba_chunk_scan_combined

    kw = ssd_inputs(tokens // L, L, 32, 64, 1, d_state, torch.bfloat16, init=False)
    kw.pop("z")
    leaves = {k: kw[k].detach().requires_grad_() for k in ("x", "dt", "B", "C")}
    args = dict(kw, **leaves)
    gy = torch.randn_like(kw["x"])
    for _ in range(3):
        mamba_chunk_scan_combined(**args, backend="triton").backward(gy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            for leaf in leaves.values():  # no gradient accumulation (an extra elementwise add) in the profile
                leaf.grad = None
            mamba_chunk_scan_combined(**args, backend="triton").backward(gy)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            totals[ev.name[:40]] = totals.get(ev.name[:40], 0.0) + ev.device_time / 5 / 1e3
    log(f"\n## kernel breakdown, d_state {d_state}, seqlen {L}, {tokens} tokens (ms per forward+backward)")
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:14]:
        log(f"  {ms:8.3f}  {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--d-states", type=int, nargs="+", default=[64, 128])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--log")
    a = p.parse_args()
    report.open_log(a.log)
    log(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    first_call_latency()
    if not a.skip_check:
        correctness(a.quick)
    check_fla_equivalence()
    speed(a.seqlens, a.d_states, a.tokens)
    kernel_breakdown(128)
    sys.exit(report.finish())


if __name__ == "__main__":
    main()
