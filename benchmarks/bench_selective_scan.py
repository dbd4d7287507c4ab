"""Time the Triton selective scan on a GPU: forward and forward+backward, against our torch path and a plain copy.

Run on a CUDA machine:  PYTHONUNBUFFERED=1 python3 benchmarks/bench_selective_scan.py [--variants] [--out FILE.md]
Shape: batch 8, dim 2048, d_state 16, seqlen 2K and 8K; u, delta, z, B, C bf16; A, D, delta_bias fp32;
delta_softplus, with z (the Mamba-1 block's call). Times are medians of triton.testing.do_bench (CUDA events).
Bandwidth = minimum bytes / time, where the minimum reads every input and writes every output once:
  forward          u, delta, z, B, C read, y written                           (4 b d L + 2 b N L) x 2 bytes
  forward+backward the forward's bytes + u, delta, z, B, C, dy read,
                   du, ddelta, dz, dB, dC written                              (11 b d L + 6 b N L) x 2 bytes
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from _common import gpu_ms  # noqa: E402

from mambakit.ops.selective_scan import selective_scan_fn  # noqa: E402
from mambakit.ops.triton import selective_scan as tss  # noqa: E402

OFFICIAL_H100 = {2048: (0.594, 3.23), 8192: (2.67, 13.2)}  # mamba_ssm CUDA scan, ms (shared/REFERENCES.md)


def make_inputs(batch, dim, N, L, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf = "cuda", torch.bfloat16
    A = -torch.arange(1, N + 1, device=dev, dtype=torch.float32).repeat(dim, 1)
    dt = torch.exp(torch.rand(dim, generator=g, device=dev) * 4.6 - 6.9)
    kw = dict(
        u=torch.randn(batch, dim, L, generator=g, device=dev).to(bf),
        delta=(torch.randn(batch, dim, L, generator=g, device=dev) * 0.5).to(bf),
        A=A, B=torch.randn(batch, N, L, generator=g, device=dev).to(bf),
        C=torch.randn(batch, N, L, generator=g, device=dev).to(bf),
        D=torch.ones(dim, device=dev), z=torch.randn(batch, dim, L, generator=g, device=dev).to(bf),
        delta_bias=dt + torch.log(-torch.expm1(-dt)), delta_softplus=True)
    return kw


def leaves(kw):
    return [v for v in kw.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def time_fwd(kw, backend, rep, **extra):
    def f():
        with torch.no_grad():
            selective_scan_fn(**kw, backend=backend) if not extra else tss.selective_scan_triton(**kw, **extra)
    return gpu_ms(f, warmup=max(25, rep // 4), rep=rep)


def time_fwd_bwd(kw, backend, rep, **extra):
    for t in leaves(kw):
        t.requires_grad_(True)
    gy = torch.randn_like(kw["u"])

    def f():
        y = selective_scan_fn(**kw, backend=backend) if not extra else tss.selective_scan_triton(**kw, **extra)
        y.backward(gy)
    ms = gpu_ms(f, warmup=max(25, rep // 4), rep=rep, grad_to_none=leaves(kw))
    for t in leaves(kw):
        t.requires_grad_(False)
        t.grad = None
    return ms


def kernel_breakdown(kw, reps=5):
    from torch.profiler import ProfilerActivity, profile

    for t in leaves(kw):
        t.requires_grad_(True)
    gy = torch.randn_like(kw["u"])

    def f():
        for t in leaves(kw):
            t.grad = None  # no gradient-accumulation kernels in the breakdown
        selective_scan_fn(**kw, backend="triton").backward(gy)
    f()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            f()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = getattr(e, "cuda_time_total", 0.0)
        if us > 0:
            rows.append((us / reps, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    return [f"| {name[:90]} | {us:.1f} |" for us, name in rows[:12]] + [f"| total | {total:.1f} |"]


def copy_bandwidth():
    x = torch.empty(2**28, device="cuda", dtype=torch.float32).normal_()
    y = torch.empty_like(x)
    ms = gpu_ms(lambda: y.copy_(x), warmup=50, rep=300)
    return 2 * x.numel() * 4 / (ms * 1e-3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", action="store_true", help="also time alternative block shapes at seqlen 2K")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch-path timings")
    ap.add_argument("--out", default=None, help="write the result table (markdown) here")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    lines = [f"device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
             f"triton {triton.__version__}"]
    bw = copy_bandwidth()
    lines.append(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)")
    print("\n".join(lines), flush=True)
    batch, dim, N = 8, 2048, 16
    rows = []
    for L in (2048, 8192):
        kw = make_inputs(batch, dim, N, L)
        bdl, bnl = batch * dim * L, batch * N * L
        fwd_bytes = (4 * bdl + 2 * bnl) * 2
        fb_bytes = (11 * bdl + 6 * bnl) * 2
        t_f = time_fwd(kw, "triton", 300)
        t_fb = time_fwd_bwd(kw, "triton", 500)
        t_f_torch = t_fb_torch = float("nan")
        if not args.no_torch:
            t_f_torch = time_fwd(kw, "torch", 300)
            t_fb_torch = time_fwd_bwd(kw, "torch", 800)
        off = OFFICIAL_H100.get(L) if "H100" in props.name else None
        rows.append((L, t_f, t_fb, t_f_torch, t_fb_torch, fwd_bytes, fb_bytes, off))
        print(f"seqlen {L}: triton fwd {t_f:.3f} ms, fwd+bwd {t_fb:.3f} ms; torch fwd {t_f_torch:.2f} ms, "
              f"fwd+bwd {t_fb_torch:.2f} ms", flush=True)
        del kw
        torch.cuda.empty_cache()
    out = ["", f"batch {batch}, dim {dim}, d_state {N}, bf16 inputs (A, D, delta_bias fp32), softplus, with z", "",
           "| seqlen | pass | Triton ms | min GB | GB/s | % of copy | torch path ms | torch / Triton |"
           " official CUDA ms (H100) | official / Triton |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for L, t_f, t_fb, tf_t, tfb_t, fb_, fbb, off in rows:
        for name, t, nbytes, tt, o in (("fwd", t_f, fb_, tf_t, off[0] if off else None),
                                       ("fwd+bwd", t_fb, fbb, tfb_t, off[1] if off else None)):
            gbs = nbytes / (t * 1e-3) / 1e9
            out.append(f"| {L} | {name} | {t:.3f} | {nbytes / 1e9:.3f} | {gbs:.0f} | {100 * gbs * 1e9 / bw:.0f}% | "
                       f"{tt:.2f} | {tt / t:.1f}x | {o if o else '-'} | {f'{o / t:.2f}x' if o else '-'} |")
    out += ["", "Kernel time breakdown of one forward+backward at seqlen 2048 (torch.profiler, mean of 5)", "",
            "| kernel | us |", "|---|---|"]
    out += kernel_breakdown(make_inputs(batch, dim, N, 2048))
    print("\n".join(out[-8:]), flush=True)
    if args.variants:
        kw = make_inputs(batch, dim, N, 2048)
        base = tss.pick_config(N, dim, dim, 1)
        out += ["", "Block-shape variants at seqlen 2048 (fwd: forward kernel only; fwd+bwd: base forward + the "
                "backward variant)", "", "| variant | fwd ms | fwd+bwd ms |", "|---|---|---|"]
        fwd_vars = [("base fwd BD16 BT8 W1", base),
                    ("fwd BD8 BT8 W1", tss.ScanConfig(4, 4, 8, 8, 1, 64, 4, 4, 64)),
                    ("fwd BD32 BT4 W1", tss.ScanConfig(4, 4, 32, 4, 1, 64, 4, 4, 64)),
                    ("fwd BD64 BT8 W4", tss.ScanConfig(4, 4, 64, 8, 4, 64, 4, 4, 64)),
                    ("fwd BD16 BT16 W1", tss.ScanConfig(4, 4, 16, 16, 1, 64, 4, 4, 64))]
        for name, cfg in fwd_vars:
            t = time_fwd(kw, "triton", 200, config=cfg)
            out.append(f"| {name} | {t:.3f} | |")
            print(out[-1], flush=True)
        bwd_vars = [("base bwd BD16 BT4 W1", base),
                    ("bwd BD8 BT8 W1", tss.ScanConfig(4, 4, 16, 8, 1, 8, 8, 1, 64)),
                    ("bwd BD8 BT4 W1", tss.ScanConfig(4, 4, 16, 8, 1, 8, 4, 1, 64)),
                    ("bwd BD16 BT4 W2", tss.ScanConfig(4, 4, 16, 8, 1, 16, 4, 2, 64)),
                    ("bwd BD32 BT4 W4", tss.ScanConfig(4, 4, 16, 8, 1, 32, 4, 4, 64)),
                    ("bwd BD64 BT2 W4", tss.ScanConfig(4, 4, 16, 8, 1, 64, 2, 4, 64)),
                    ("bwd BD16 BT2 W1", tss.ScanConfig(4, 4, 16, 8, 1, 16, 2, 1, 64)),
                    ("base, chunk 128", tss.ScanConfig(4, 4, 16, 8, 1, 16, 4, 1, 128))]
        for name, cfg in bwd_vars:
            t = time_fwd_bwd(kw, "triton", 300, config=cfg)
            out.append(f"| {name} | | {t:.3f} |")
            print(out[-1], flush=True)
    text = "\n".join(lines + out)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
