"""The Mamba-2 SSD op under the input forms users pass, side by side with the official kernels (issue 26).

    python benchmarks/bench_ssd_forms.py                       # GPU: bf16, 32 x 2048 tokens, 32 heads x 64, d_state 64
    python benchmarks/bench_ssd_forms.py --forms base dt_fp32 z
    python benchmarks/bench_ssd_forms.py --device cpu --tiny   # smoke test: the interpreter, a tiny shape, float32

Each form changes one thing of the base call `mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=256, D=D,
dt_bias=dt_bias, dt_softplus=True)` with x/dt/B/C in bf16 and A/D/dt_bias in float32 (FORMS says what). Per form:
mambakit's forward and forward+backward ms (CUDA events, median), the official `mamba_ssm` Triton SSD's in the same
process when importable (else mambakit alone, saying so), their ratio, and the relative error of mambakit's output
against the official's (or, without it, against mambakit's PyTorch chunked form). Rows print as they finish, so a
run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Optional

FORMS = {
    "base": "x/dt/B/C bf16, A/D/dt_bias fp32, chunk 256, dt_softplus, no z, no initial states",
    "dt_fp32": "dt in float32",
    "chunk64": "chunk_size 64",
    "chunk128": "chunk_size 128",
    "z": "with z (the gate inside the op)",
    "init": "with float32 initial states",
    "D_channel": "D per channel (nheads, headdim)",
    "no_softplus": "dt_softplus False, no dt_bias",
    "groups8": "8 groups of B/C",
    "seq_idx": "four packed sequences per row (seq_idx)",
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--no-official", action="store_true")
    return p.parse_args()


ARGS = parse()
if ARGS.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from _common import Rows, device_line, gpu_ms, official_function, rel_err, table, time_ms  # noqa: E402
from mambakit.ops.ssd import mamba_chunk_scan_combined  # noqa: E402


def inputs(form: str, batch: int, seqlen: int, nheads: int, headdim: int, d_state: int, dtype: torch.dtype,
           device: str) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    ngroups = min(8, nheads) if form == "groups8" else 1
    kw: dict[str, Any] = dict(
        x=r(batch, seqlen, nheads, headdim), dt=r(batch, seqlen, nheads, dt=torch.float32 if form == "dt_fp32"
                                                 else dtype, scale=0.5),
        A=-torch.exp(torch.rand(nheads, generator=g, device=device) * 2.7),
        B=r(batch, seqlen, ngroups, d_state), C=r(batch, seqlen, ngroups, d_state),
        chunk_size={"chunk64": 64, "chunk128": 128}.get(form, 256),
        D=r(nheads, headdim, dt=torch.float32) if form == "D_channel" else r(nheads, dt=torch.float32))
    if form != "no_softplus":
        kw.update(dt_bias=r(nheads, dt=torch.float32, scale=0.5) - 3.0, dt_softplus=True)
    else:
        kw["dt"] = kw["dt"].float().abs().mul(0.05).to(kw["dt"].dtype)
    if form == "z":
        kw["z"] = r(batch, seqlen, nheads, headdim)
    if form == "init":
        kw["initial_states"] = r(batch, nheads, headdim, d_state, dt=torch.float32)
    if form == "seq_idx":
        pos = torch.arange(seqlen, device=device)
        kw["seq_idx"] = (pos[None, :] // max(1, seqlen // 4)).clamp(max=3).to(torch.int32).expand(batch, -1) \
            .contiguous()
    return kw


def with_grad(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v) for k, v in kw.items()}


def timed(fn: Callable[[], Any]) -> float:
    if ARGS.device == "cuda":
        return gpu_ms(fn, warmup=10, rep=50)
    return time_ms(fn, repeats=1, warmup=0)


def fwd_and_fb(op: Callable[..., torch.Tensor], kw: dict[str, Any]) -> tuple[float, float, torch.Tensor]:
    out = op(**kw)
    gy = torch.randn_like(out)
    kg = with_grad(kw)
    params = [v for v in kg.values() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fb():
        for p in params:
            p.grad = None
        op(**kg).backward(gy)

    with torch.no_grad():
        f = timed(lambda: op(**kw))
    return f, timed(fb), out


def official_op() -> Optional[Callable[..., torch.Tensor]]:
    if ARGS.no_official or ARGS.device != "cuda":
        return None
    return official_function("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")


def main() -> int:
    device = ARGS.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch, seqlen, nheads, headdim, d_state = ((1, 48, 2, 8, 8) if ARGS.tiny else
                                               (ARGS.batch, ARGS.seqlen, 32, 64, ARGS.d_state))
    print(f"# {device_line() if device == 'cuda' else 'cpu (Triton interpreter)'}; batch {batch} x {seqlen}, "
          f"{nheads} heads x {headdim}, d_state {d_state}, {dtype}")
    official = official_op()
    ours = lambda **kw: mamba_chunk_scan_combined(**kw, backend="triton")  # noqa: E731
    rows = Rows("ssd_forms")
    for form in ARGS.forms:
        kw = inputs(form, batch, seqlen, nheads, headdim, d_state, dtype, device)
        f, fb, out = fwd_and_fb(ours, kw)
        row: dict[str, Any] = dict(form=form, what=FORMS[form], fwd_ms=f, fb_ms=fb)
        if official is not None:
            of, ofb, oout = fwd_and_fb(official, kw)
            row.update(official_fwd_ms=of, official_fb_ms=ofb, fwd_speedup=of / f, fb_speedup=ofb / fb,
                       rel_err=rel_err(out.float(), oout.float()))
        else:
            ref = mamba_chunk_scan_combined(**kw, backend="torch")
            row["rel_err"] = rel_err(out.float(), ref.float())
        rows.add(**row)
        print("ROW " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
        del kw, out
    rows.save()
    cols = ["form", "fwd_ms", "fb_ms", "rel_err"]
    if official is not None:
        cols[3:3] = ["official_fwd_ms", "official_fb_ms", "fwd_speedup", "fb_speedup"]
    print("\n" + table(rows.rows, cols + ["what"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
