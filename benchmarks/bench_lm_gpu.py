"""GPU: one training step of the 130M-shape Mamba-1 and Mamba-2 LMs, and decoding throughput of Mamba-1.

    python benchmarks/bench_lm_gpu.py                    # d_model 768, 24 layers, batch 8, seqlen 2048, bf16 autocast

Training step = forward + backward + AdamW step, bf16 autocast with fp32 weights. Decoding: a 2048-token prompt
prefilled, then 128 one-token steps (plain eager steps: no CUDA graph yet), tokens/s at batch 1, 16, 64.
"""
from __future__ import annotations

import argparse
import time

import torch

from mambakit import MambaConfig, MambaLMHeadModel


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def train_step_time(arch: str, args) -> tuple[float, float, float]:
    ssm_cfg = {"layer": "Mamba2", "d_state": 128, "headdim": 64} if arch == "mamba2" else {}
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=50277,
                                         ssm_cfg=ssm_cfg), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, 50277, (args.batch, args.seqlen + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_first = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t_first
    torch.cuda.reset_peak_memory_stats()
    t = timed(step, args.repeats)
    return t, first, torch.cuda.max_memory_allocated() / 2**30


@torch.no_grad()
def decode_throughput(batch: int, args) -> tuple[float, float]:
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=50277),
                             device="cuda", dtype=torch.float16).eval()
    ids = torch.randint(0, 50277, (batch, args.prompt), device="cuda")
    cache = model.allocate_cache(batch)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    logits = model(ids, cache=cache, num_last_tokens=1).logits[:, -1]
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t0
    tok = logits.argmax(-1)
    model.step(tok, cache)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.new_tokens):
        tok = model.step(tok, cache).argmax(-1)
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / args.new_tokens
    return prefill, per_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip-decode", action="store_true", help="only the training steps")
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"| LM ({args.d_model}, {args.n_layer} layers) | batch x seqlen | step ms | tokens/s | "
          f"first step s | peak GiB |")
    print("|---|---|---|---|---|---|")
    for arch in ("mamba1", "mamba2"):
        try:
            t, first, mem = train_step_time(arch, args)
            print(f"| {arch} | {args.batch} x {args.seqlen} | {t * 1e3:.1f} | {args.batch * args.seqlen / t:,.0f} | "
                  f"{first:.1f} | {mem:.1f} |", flush=True)
        except Exception as exc:  # report and go on: one failure must not hide the other numbers
            print(f"| {arch} | failed: {type(exc).__name__}: {exc} |", flush=True)
        torch.cuda.empty_cache()
    if args.skip_decode:
        return
    print(f"\n| decode (Mamba-1, fp16, eager steps) | prefill {args.prompt} s | ms per step | tokens/s |")
    print("|---|---|---|---|")
    for batch in (1, 16, 64):
        prefill, per_step = decode_throughput(batch, args)
        print(f"| batch {batch} | {prefill:.3f} | {per_step * 1e3:.2f} | {batch / per_step:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
