"""The Triton causal conv1d (+ SiLU, width 4, bias) on the GPU: checked against the float64 PyTorch conv, then its
forward and backward timed against the official `causal_conv1d_fn` (when `import causal_conv1d` works).

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_conv1d.py [--sweep] [--log FILE]
    python benchmarks/bench_conv1d.py --tiny     # CPU smoke run: tiny shapes on the Triton interpreter

Layouts, bfloat16: x (8, 1536, 2048) contiguous; x the channel-last slice (8, 2048, 3072)[..., :1536] viewed as
(batch, dim, seqlen) (how the Mamba-1 block hands the conv a slice of its in_proj output); the Mamba-2 xBC slice
(8, 2048, 3352)[..., 1536:3328] (a row stride that is a multiple of 8, not 16); gy channel-last for the slices.
Rows (JSON lines in $OUT/conv1d.jsonl): per layout and implementation the medians of triton.testing.do_bench (CUDA
events, L2 flushed) of forward, backward alone (ours: `conv1d_backward`, dx into a slice of a gradient buffer for
the channel-last case) and forward+backward through autograd, with the backward's bandwidth against its floor (read
x and gy, write dx once). Our backward is also timed in its recomputing form (`BACKWARD_GATHER = False`), and with
--sweep over other tiles (`block_sizes`). Exit code 1 if a check fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

TINY = "--tiny" in sys.argv
if TINY:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before mambakit imports triton
else:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="mambakit-triton-cache-"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from _common import Rows, device_line, gpu_ms, official_function, rel_err, report, table, time_ms  # noqa: E402
from mambakit.ops.conv1d import triton as conv  # noqa: E402
from mambakit.ops.conv1d.naive import causal_conv1d_torch  # noqa: E402

log, check = report.log, report.check
WIDTH = 4
SWEEP = {True: [(64, 32), (64, 64), (32, 128), (128, 32)], False: [(4, 256), (8, 256), (16, 128), (4, 512)]}


def official_conv():
    """The official causal_conv1d_fn, or None (and a note)."""
    return official_function("causal_conv1d", "causal_conv1d_fn", log)


def make_inputs(batch, dim, seqlen, buffer, device, seed=0):
    """x, gy (bfloat16, x's layout), weight, bias (float32), the dx view of a gradient buffer (or None).

    buffer: None for contiguous x, else (width, offset): x (and dx) are the channels [offset, offset + dim) of a
    (batch, seqlen, width) buffer, viewed as (batch, dim, seqlen); gy is channel-last."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(torch.bfloat16)

    if buffer is not None:
        width, offset = buffer
        x = randn(batch, seqlen, width)[..., offset:offset + dim].transpose(1, 2)
        gy = randn(batch, seqlen, dim).transpose(1, 2)
        dx_view = torch.empty(batch, seqlen, width, device=device, dtype=torch.bfloat16)[..., offset:offset + dim]
        dx_view = dx_view.transpose(1, 2)
    else:
        x, gy, dx_view = randn(batch, dim, seqlen), randn(batch, dim, seqlen), None
    w = (torch.randn(dim, WIDTH, generator=g, device=device) / WIDTH).requires_grad_()
    b = torch.randn(dim, generator=g, device=device).requires_grad_()
    return x, gy, w, b, dx_view


def check_layout(label, x, gy, w, b, dx_view) -> None:
    log(f"  {label}")
    leaves = [x.detach().double().requires_grad_(), w.detach().double().requires_grad_(),
              b.detach().double().requires_grad_()]
    ref = causal_conv1d_torch(*leaves, "silu")
    ref_grads = torch.autograd.grad(ref, leaves, gy.double())
    y = conv.conv1d_forward(x, w, b, True, None)
    check("y", rel_err(y, ref), 1e-2)
    check("y layout follows x", 0.0 if conv.is_channel_last(y) == conv.is_channel_last(x) else float("inf"), 0)
    grads = [t.clone() for t in conv.conv1d_backward(x, w, b, True, None, gy, dx_out=dx_view)]
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        check(name, rel_err(got, want), 1e-2)
    again = conv.conv1d_backward(x, w, b, True, None, gy, dx_out=dx_view)
    same = all(torch.equal(a, c) for a, c in zip(grads, again))
    check("gradients bit-identical (2 runs)", 0.0 if same else float("inf"), 0)


def timer(tiny):
    return (lambda fn, **kw: time_ms(fn, repeats=1, warmup=0)) if tiny else gpu_ms


def time_layout(rows, label, x, gy, w, b, dx_view, official, tiny, sweep) -> None:
    ms = timer(tiny)
    floor_bytes = 3 * x.numel() * x.element_size()  # read x and gy, write dx
    # autograd's leaf: a dense tensor of x's layout
    xg = (x.detach().transpose(1, 2).contiguous().transpose(1, 2) if conv.is_channel_last(x)
          else x.detach().clone()).requires_grad_()

    def row(impl, fwd, bwd, fwd_bwd, **extra):
        gbps = None if bwd is None else floor_bytes / (bwd * 1e-3) / 1e9
        rows.add(layout=label, impl=impl, fwd_ms=fwd, bwd_ms=bwd, fwd_bwd_ms=fwd_bwd, bwd_floor_gbps=gbps, **extra)

    def ours_bwd():
        conv.conv1d_backward(x, w, b, True, None, gy, dx_out=dx_view)

    def ours_fwd_bwd():
        conv.causal_conv1d_triton(xg, w, b, "silu").backward(gy)

    fwd = ms(lambda: conv.conv1d_forward(x, w, b, True, None))
    row("triton", fwd, ms(ours_bwd), ms(ours_fwd_bwd, grad_to_none=[xg, w, b]))
    saved = conv.BACKWARD_GATHER
    conv.BACKWARD_GATHER = False
    try:
        row("triton (recompute bwd)", None, ms(ours_bwd), None)
    finally:
        conv.BACKWARD_GATHER = saved
    if sweep:
        saved_blocks = conv.block_sizes
        for bd, bt in SWEEP[conv.is_channel_last(x)]:
            conv.block_sizes = lambda channel_last, backward, _s=(bd, bt): _s
            try:
                row(f"triton tile {bd}x{bt}", ms(lambda: conv.conv1d_forward(x, w, b, True, None)), ms(ours_bwd),
                    None)
            finally:
                conv.block_sizes = saved_blocks
    if official is not None:
        try:
            with torch.no_grad():
                off_fwd = ms(lambda: official(x, w, b, activation="silu"))
            off_fb = ms(lambda: official(xg, w, b, activation="silu").backward(gy), grad_to_none=[xg, w, b])
        except Exception as exc:  # an official build that refuses this layout or dtype: say so, keep going
            log(f"    official causal_conv1d failed here: {type(exc).__name__}: {exc}")
        else:
            row("official causal_conv1d", off_fwd, None, off_fb)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes on the Triton interpreter")
    ap.add_argument("--sweep", action="store_true", help="also time other tiles (block_sizes)")
    ap.add_argument("--log", help="also write the log to this file")
    args = ap.parse_args(argv)
    report.open_log(args.log)
    if args.tiny:
        device, batch, seqlen = "cpu", 1, 20
        cases = [(6, None), (6, (12, 0)), (7, (17, 5))]
    else:
        if not torch.cuda.is_available():
            log("error: needs a CUDA GPU (or --tiny for the CPU smoke run)")
            return 2
        device, batch, seqlen = "cuda", 8, 2048
        # contiguous; Mamba-1 x, the first half of in_proj's (.., 3072) output; Mamba-2 d_model 768 xBC, the
        # channels [1536, 3328) of its (.., 3352) zxbcdt
        cases = [(1536, None), (1536, (3072, 0)), (1792, (3352, 1536))]
    log(f"# {device_line()}; conv width {WIDTH}, SiLU, bias, bfloat16 x and gy")
    official = None if args.tiny else official_conv()
    rows = Rows("conv1d")
    for dim, buffer in cases:
        label = (f"contiguous ({batch}, {dim}, {seqlen})" if buffer is None else
                 f"channel-last ({batch}, {seqlen}, {buffer[0]})[..., {buffer[1]}:{buffer[1] + dim}]")
        x, gy, w, b, dx_view = make_inputs(batch, dim, seqlen, buffer, device)
        check_layout(label, x, gy, w, b, dx_view)
        time_layout(rows, label, x, gy, w, b, dx_view, official, args.tiny, args.sweep)
    rows.save()
    log("\n" + table(rows.rows, ["layout", "impl", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "bwd_floor_gbps"]))
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
