"""GPU checks of the Triton kernels (selective scan, causal conv1d, decode step) against the torch references.

Run on a CUDA machine:  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check_selective_scan.py [--quick] [--log FILE]
- first-call latency of a Mamba block's first forward+backward (conv + scan, cold Triton cache);
- large shapes, all input dtypes: fp32 <= 1e-5 and bf16/fp16 <= 1e-2 relative error against a float64 reference
  (the chunked torch path on the GPU; the sequential loop is too slow at these sizes), gradients included;
- outputs written everywhere (the caching allocator is poisoned with NaN before each call);
- determinism: two backward passes give bit-identical gradients.
Exit code 1 if any check fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zlib

# A cold, private Triton cache so that the first call pays the real compile cost.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="mambakit-triton-cache-")
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import poison, rel_err, report  # noqa: E402

log, check = report.log, report.check


def scan_inputs(batch, dim, N, L, dtype, groups=0, with_z=True, with_D=True, with_bias=True, with_h0=False,
                packed=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"

    def r(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=dev) * scale + shift).to(dt).requires_grad_()

    bc = (batch, N, L) if groups == 0 else (batch, groups, N, L)
    A_log = torch.log(torch.arange(1, N + 1, device=dev, dtype=torch.float32)).repeat(dim, 1)
    A = (-torch.exp(A_log) * (0.5 + torch.rand(dim, N, generator=g, device=dev))).requires_grad_()
    dt_init = torch.exp(torch.rand(dim, generator=g, device=dev) * (torch.log(torch.tensor(0.1)) - torch.log(
        torch.tensor(0.001))) + torch.log(torch.tensor(0.001)))
    kw = dict(u=r(batch, dim, L), delta=r(batch, dim, L, scale=0.5), A=A, B=r(*bc), C=r(*bc),
              D=r(dim, dt=torch.float32) if with_D else None, z=r(batch, dim, L) if with_z else None,
              delta_bias=(dt_init + torch.log(-torch.expm1(-dt_init))).requires_grad_() if with_bias else None,
              delta_softplus=True,
              initial_state=r(batch, dim, N, dt=torch.float32) if with_h0 else None)
    if packed:
        idx = torch.zeros(batch, L, dtype=torch.int32, device=dev)
        for b in range(batch):
            for c in torch.randint(1, L, (5,), generator=g, device=dev).tolist():
                idx[b, c:] += 1
        kw["seq_idx"] = idx
    return kw


def grad_names(kw):
    return [k for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad]


def run_scan(fn, kw, gy, gs, **extra):
    names = grad_names(kw)
    y, last = fn(**kw, return_last_state=True, **extra)
    grads = torch.autograd.grad([y, last], [kw[n] for n in names], [gy.to(y.dtype), gs.to(last.dtype)])
    return y, last, dict(zip(names, grads))


def check_scan_case(label, batch, dim, N, L, dtype, determinism=False, **flags):
    from mambakit.ops.selective_scan import selective_scan_chunked
    from mambakit.ops.triton.selective_scan import selective_scan_triton

    log(f"  scan {label}: batch {batch}, dim {dim}, d_state {N}, seqlen {L}, {str(dtype).replace('torch.', '')}, "
        f"{ {k: v for k, v in flags.items() if v} }")
    kw = scan_inputs(batch, dim, N, L, dtype, seed=zlib.crc32(label.encode()) % 10000, **flags)
    g = torch.Generator(device="cuda").manual_seed(7)
    gy = torch.randn(batch, dim, L, generator=g, device="cuda")
    gs = torch.randn(batch, dim, N, generator=g, device="cuda")
    gy = gy.to(dtype).float()  # the same output gradient for the kernel (cast to y's dtype) and the reference
    poison()
    t0 = time.perf_counter()
    y, last, grads = run_scan(selective_scan_triton, kw, gy, gs)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    kw64 = {k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
                and v.is_floating_point() else v) for k, v in kw.items()}
    yr, lastr, gr = run_scan(selective_scan_chunked, kw64, gy.double(), gs.double())
    torch.cuda.synchronize()
    log(f"    (triton fwd+bwd {1e3 * (t1 - t0):.1f} ms incl. any compile; "
        f"fp64 reference {time.perf_counter() - t1:.1f} s)")
    half = dtype != torch.float32
    check("y", rel_err(y, yr), 1e-2 if half else 1e-5)
    check("last_state", rel_err(last, lastr), 1e-3 if half else 1e-5)
    for n in grad_names(kw):
        tol = 1e-2 if (half and kw[n].dtype != torch.float32) else (1e-3 if half else 1e-5)
        check(f"d{n} ({str(kw[n].dtype).replace('torch.', '')})", rel_err(grads[n], gr[n]), tol)
    if determinism:
        poison()
        y2, last2, grads2 = run_scan(selective_scan_triton, kw, gy, gs)
        same = torch.equal(y, y2) and torch.equal(last, last2) and all(torch.equal(grads[n], grads2[n]) for n in grads)
        if not same:
            report.fail(f"scan {label}: not deterministic")
        log(f"    determinism (2 runs bit-identical)  {'ok' if same else 'FAIL'}")
    del kw, kw64, grads, gr, y, yr


def check_conv_case(label, batch, dim, L, width, dtype, channel_last=False, packed=False):
    from mambakit.ops.conv1d import causal_conv1d_fn
    from mambakit.ops.triton.conv1d import causal_conv1d_triton

    log(f"  conv1d {label}: batch {batch}, dim {dim}, seqlen {L}, width {width}, {str(dtype).replace('torch.', '')}, "
        f"channel_last={channel_last}, packed={packed}")
    g = torch.Generator(device="cuda").manual_seed(3)
    xs = torch.randn(batch, L, dim, generator=g, device="cuda").transpose(1, 2) if channel_last else \
        torch.randn(batch, dim, L, generator=g, device="cuda")
    x = xs.to(dtype).requires_grad_()
    w = (torch.randn(dim, width, generator=g, device="cuda") * 0.5).requires_grad_()
    b = torch.randn(dim, generator=g, device="cuda").requires_grad_()
    seq = None
    if packed:
        seq = torch.zeros(batch, L, dtype=torch.int32, device="cuda")
        seq[:, L // 3:] = 1
        seq[:, L // 2 + 1:] = 2
    gy = torch.randn(batch, dim, L, generator=g, device="cuda").to(dtype)
    poison()
    y = causal_conv1d_triton(x, w, b, "silu", seq_idx=seq)
    gt = torch.autograd.grad(y, [x, w, b], gy)
    p64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    yr = causal_conv1d_fn(*p64, activation="silu", seq_idx=seq)
    gr = torch.autograd.grad(yr, p64, gy.double())
    half = dtype != torch.float32
    check("y", rel_err(y, yr), 1e-2 if half else 1e-5)
    for n, a, r in zip(("dx", "dweight", "dbias"), gt, gr):
        check(n, rel_err(a, r), (1e-2 if n == "dx" else 1e-3) if half else 1e-5)
    y2 = causal_conv1d_triton(x, w, b, "silu", seq_idx=seq)
    g2 = torch.autograd.grad(y2, [x, w, b], gy)
    same = torch.equal(y, y2) and all(torch.equal(a, c) for a, c in zip(gt, g2))
    if not same:
        report.fail(f"conv {label}: not deterministic")
    log(f"    determinism                         {'ok' if same else 'FAIL'}")


def check_update_case(label, batch, dim, N, groups, state_dtype, in_dtype):
    from mambakit.ops.selective_scan import selective_state_update
    from mambakit.ops.triton.state_update import selective_state_update_triton

    log(f"  decode step {label}: batch {batch}, dim {dim}, d_state {N}, groups {groups}, state "
        f"{str(state_dtype).replace('torch.', '')}, inputs {str(in_dtype).replace('torch.', '')}")
    g = torch.Generator(device="cuda").manual_seed(5)
    dev = "cuda"
    bc = (batch, N) if groups == 0 else (batch, groups, N)
    kw = dict(x=torch.randn(batch, dim, generator=g, device=dev).to(in_dtype),
              dt=(torch.randn(batch, dim, generator=g, device=dev) * 0.5 - 1).to(in_dtype),
              A=-torch.rand(dim, N, generator=g, device=dev) * 4 - 0.1,
              B=torch.randn(bc, generator=g, device=dev).to(in_dtype),
              C=torch.randn(bc, generator=g, device=dev).to(in_dtype),
              D=torch.randn(dim, generator=g, device=dev),
              z=torch.randn(batch, dim, generator=g, device=dev).to(in_dtype),
              dt_bias=torch.randn(dim, generator=g, device=dev) * 0.3, dt_softplus=True)
    st = torch.randn(batch, dim, N, generator=g, device=dev)
    st_t = st.to(state_dtype)
    st_r = st_t.double()
    y = selective_state_update_triton(st_t, **kw)
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    yr = selective_state_update(st_r, **kw64)
    tol = 1e-5 if (state_dtype == torch.float32 and in_dtype == torch.float32) else 1e-2
    check("y", rel_err(y, yr), tol)
    check("state (in place)", rel_err(st_t, st_r), tol)


def first_call_latency():
    """A Mamba block's first forward+backward: conv1d(+silu) then the scan, bf16, cold Triton cache."""
    from mambakit.ops.triton.conv1d import causal_conv1d_triton
    from mambakit.ops.triton.selective_scan import selective_scan_triton

    batch, d_inner, N, L = 2, 1536, 16, 1024
    kw = scan_inputs(batch, d_inner, N, L, torch.bfloat16, seed=1)
    w = (torch.randn(d_inner, 4, device="cuda") * 0.5).requires_grad_()
    b = torch.randn(d_inner, device="cuda").requires_grad_()

    def step():
        ts = [time.perf_counter()]
        x = causal_conv1d_triton(kw["u"], w, b, "silu")
        torch.cuda.synchronize()
        ts.append(time.perf_counter())
        y = selective_scan_triton(**{**kw, "u": x})
        torch.cuda.synchronize()
        ts.append(time.perf_counter())
        y.float().square().mean().backward()
        torch.cuda.synchronize()
        ts.append(time.perf_counter())
        return ts

    torch.cuda.synchronize()
    ts = step()
    ts2 = step()
    t0, t1, t2 = ts[0], ts[-1], ts2[-1] - ts2[0]
    log(f"  first forward+backward (conv + scan, batch {batch}, d_inner {d_inner}, seqlen {L}, bf16, cold cache): "
        f"{t1 - t0:.2f} s (conv fwd {ts[1] - ts[0]:.2f} s, scan fwd {ts[2] - ts[1]:.2f} s, "
        f"both backwards {ts[3] - ts[2]:.2f} s); second call {1e3 * t2:.1f} ms")
    if t1 - t0 > 10.0:
        report.fail(f"first-call latency {t1 - t0:.1f} s > 10 s")
    return t1 - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the largest cases")
    ap.add_argument("--log", default=None)
    args = ap.parse_args()
    report.open_log(args.log)
    if not torch.cuda.is_available():
        log("no CUDA device")
        return 2
    import triton

    props = torch.cuda.get_device_properties(0)
    log(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
        f"triton {triton.__version__}")
    log("first-call latency")
    first_call_latency()
    log("selective scan")
    check_scan_case("benchmark shape", 8, 2048, 16, 2048, torch.bfloat16, determinism=True)
    check_scan_case("fp32 h0+seq_idx", 2, 1024, 16, 4096, torch.float32, with_h0=True, packed=True, determinism=True)
    check_scan_case("fp16 grouped", 4, 768, 16, 1000, torch.float16, groups=4)
    check_scan_case("fp32 grouped odd", 2, 96, 12, 517, torch.float32, groups=3, with_h0=True, packed=True)
    check_scan_case("fp32 d_state 64 bare", 2, 256, 64, 777, torch.float32, with_z=False, with_D=False, with_bias=False)
    check_scan_case("fp32 d_state 256", 1, 64, 256, 300, torch.float32, with_h0=True)
    check_scan_case("bf16 odd", 3, 100, 7, 333, torch.bfloat16, packed=True)
    check_scan_case("fp32 seqlen 1", 2, 64, 16, 1, torch.float32, with_h0=True)
    if not args.quick:
        check_scan_case("bf16 long", 1, 1536, 16, 8192, torch.bfloat16, with_h0=True)
    log("causal conv1d")
    check_conv_case("bf16 channel-last", 8, 2048, 2048, 4, torch.bfloat16, channel_last=True)
    check_conv_case("fp32 packed", 2, 1000, 777, 3, torch.float32, packed=True)
    check_conv_case("fp32 short", 3, 64, 2, 4, torch.float32)
    log("decode step")
    check_update_case("fp32", 64, 2048, 16, 0, torch.float32, torch.float32)
    check_update_case("bf16 in, fp32 state, grouped", 16, 1024, 128, 8, torch.float32, torch.bfloat16)
    check_update_case("bf16 state", 8, 512, 16, 0, torch.bfloat16, torch.bfloat16)
    log("")
    if report.fails:
        log(f"FAILED ({len(report.fails)}):")
        for f in report.fails:
            log("  " + f)
        return 1
    log("all GPU checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
