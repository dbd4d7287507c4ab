"""The fused Triton (gated) RMSNorm on the GPU: checked against the float64 PyTorch path, then timed against it.

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_norm.py [--log FILE]

1. First-call latency (forward+backward, cold private Triton cache).
2. Correctness through the layers' dispatch (`RMSNormGated` / `RMSNorm` on CUDA): float32 <= 1e-5 and bfloat16
   <= 1e-2 relative error against the PyTorch path in float64 on the GPU (same inputs, same upstream gradient),
   output and the gradients of y, z and weight; the caching allocator poisoned with NaN before each call (unwritten
   outputs show up); bit-identical gradients run after run.
3. Speed, bfloat16 inputs with a float32 weight (what autocast hands the norms in the Mamba-2 LM training step):
   forward and forward+backward, Triton vs the PyTorch path, with the Triton kernels' achieved bandwidth.
Times are medians of triton.testing.do_bench (CUDA events, L2 flushed). Exit code 1 if a check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="mambakit-triton-cache-")
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from _common import first_call_s, gpu_ms, poison, rel_err, report  # noqa: E402

log, check = report.log, report.check
from mambakit.layers import norm as norm_layer  # noqa: E402

EPS = 1e-5
DEVICE = "cuda"
D_IN_PROJ = 3352  # Mamba-2 d_model 768: 2 * 1536 + 2 * 128 (d_state) + 24 (nheads); z is a slice of zxbcdt

# label: (shape, group_size, gated, norm_before_gate, z a column slice of a (rows, D_IN_PROJ) buffer)
CASES = {
    "gated 16384x1536 g1536": ((16384, 1536), 1536, True, False, False),
    "gated 16384x1536 g1536 z view": ((8, 2048, 1536), 1536, True, False, True),
    "gated 16384x1536 g192 nbg": ((16384, 1536), 192, True, True, False),
    "rms_norm 8x2048x768": ((8, 2048, 768), 768, False, False, False),
}


def make_inputs(shape, gated, z_view, dtype, seed=0):
    """y, z (None unless gated), weight (float32), upstream gradient (dtype); y, z, weight require grad."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    d = shape[-1]
    y = torch.randn(shape, generator=g, device=DEVICE).to(dtype).requires_grad_()
    z = None
    if gated and z_view:
        buf = torch.randn(*shape[:-1], D_IN_PROJ, generator=g, device=DEVICE).to(dtype).requires_grad_()
        z = buf[..., :d]
    elif gated:
        z = (2 * torch.randn(shape, generator=g, device=DEVICE)).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(d, generator=g, device=DEVICE)).requires_grad_()
    gout = torch.randn(shape, generator=g, device=DEVICE).to(dtype)
    return y, z, w, gout


def make_layer(d, group_size, gated, norm_before_gate, weight):
    """The layer (RMSNormGated or RMSNorm) whose weight parameter is `weight`'s value and dtype."""
    if gated:
        layer = norm_layer.RMSNormGated(d, eps=EPS, group_size=group_size, norm_before_gate=norm_before_gate)
    else:
        layer = norm_layer.RMSNorm(d, eps=EPS)
    layer.weight = torch.nn.Parameter(weight.detach().clone())
    return layer.to(DEVICE)


def call(layer, y, z):
    return layer(y, z) if isinstance(layer, norm_layer.RMSNormGated) else layer(y)


@contextlib.contextmanager
def torch_path():
    """Force the layers' PyTorch code on CUDA tensors."""
    saved = norm_layer._use_triton
    norm_layer._use_triton = lambda *args: False
    try:
        yield
    finally:
        norm_layer._use_triton = saved


def grads_of(layer, y, z, gout):
    """(out, {name: gradient}) of layer(y, z) for the upstream gradient gout."""
    leaves = {"y": y, "weight": layer.weight}
    if z is not None:
        leaves["z"] = z
    out = call(layer, y, z)
    grads = torch.autograd.grad(out, list(leaves.values()), gout)
    return out, dict(zip(leaves, grads))


def check_case(label, shape, group_size, gated, nbg, z_view, dtype) -> None:
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    log(f"  {label}, {str(dtype).replace('torch.', '')}")
    y, z, w, gout = make_inputs(shape, gated, z_view, dtype)
    layer = make_layer(shape[-1], group_size, gated, nbg, w)
    if not norm_layer._use_triton(y, layer.weight, z):
        report.fail(f"{label}: the layer does not dispatch to Triton")
        log("    not dispatched to Triton: FAIL")
        return
    poison()
    out, grads = grads_of(layer, y, z, gout)
    ref_layer = make_layer(shape[-1], group_size, gated, nbg, w.double())
    y64 = y.detach().double().requires_grad_()
    z64 = z.detach().double().requires_grad_() if z is not None else None
    ref, ref_grads = grads_of(ref_layer, y64, z64, gout.double())
    check("out dtype == y dtype", 0.0 if out.dtype == y.dtype else float("inf"), 0)
    check("out", rel_err(out, ref), tol)
    for k, v in ref_grads.items():
        check(f"d{k}", rel_err(grads[k], v), tol)
    poison()
    _, again = grads_of(layer, y, z, gout)
    same = all(torch.equal(grads[k], again[k]) for k in grads)
    check("gradients bit-identical (2 runs)", 0.0 if same else float("inf"), 0)


def first_call_latency() -> None:
    y, z, w, gout = make_inputs((64, 1536), True, False, torch.bfloat16)
    layer = make_layer(1536, 1536, True, False, w)
    seconds = first_call_s(lambda: grads_of(layer, y, z, gout))
    log(f"first forward+backward (cold Triton cache, compiles both kernels): {seconds:.2f} s")


def bytes_moved(y, z, backward: bool) -> int:
    """Bytes the Triton kernels must read and write at the least: forward y, z -> out; backward y, z, dout -> dy, dz
    (rstd and the weight are negligible)."""
    per = y.numel() * y.element_size()
    if backward:
        return per * (3 if z is None else 5)
    return per * (2 if z is None else 3)


def time_case(label, shape, group_size, gated, nbg, z_view):
    y, z, w, gout = make_inputs(shape, gated, z_view, torch.bfloat16)
    layer = make_layer(shape[-1], group_size, gated, nbg, w)
    leaves = [y, layer.weight] + ([] if z is None else [z._base if z_view else z])  # .grad reset between runs

    def fwd():
        with torch.no_grad():
            call(layer, y, z)

    def fwd_bwd():
        call(layer, y, z).backward(gout)

    times = {}
    for path, ctx in (("torch", torch_path), ("triton", contextlib.nullcontext)):
        with ctx():
            times[path] = (gpu_ms(fwd), gpu_ms(fwd_bwd, grad_to_none=leaves))
    (tf, tfb), (gf, gfb) = times["torch"], times["triton"]
    gbs_f = bytes_moved(y, z, False) / gf / 1e6
    gbs_fb = (bytes_moved(y, z, False) + bytes_moved(y, z, True)) / gfb / 1e6
    log(f"| {label:<30s} | {tf:9.3f} | {gf:10.3f} | {tf / gf:5.2f}x | {gbs_f:4.0f} "
        f"| {tfb:9.3f} | {gfb:10.3f} | {tfb / gfb:5.2f}x | {gbs_fb:4.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--log")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_norm.py needs a CUDA device")
    report.open_log(a.log)
    log(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    first_call_latency()
    if not a.skip_check:
        log("\n## correctness (through the layers' dispatch) against the float64 PyTorch path")
        for dtype in (torch.float32, torch.bfloat16):
            for label, case in CASES.items():
                check_case(label, *case, dtype)
    log("\n## speed, bf16 inputs, float32 weight; ms (median), Triton GB/s = minimal bytes / time\n")
    log(f"| {'case':<30s} | fwd torch | fwd triton | ratio  | GB/s | f+b torch | f+b triton | ratio  | GB/s |")
    log("|---|---|---|---|---|---|---|---|---|")
    for label, case in CASES.items():
        time_case(label, *case)
    sys.exit(report.finish())


if __name__ == "__main__":
    main()
