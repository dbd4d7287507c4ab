"""One LM training step (forward + cross-entropy + backward, optimizer excluded) side by side with the official
mamba_ssm, with the per-kernel breakdown of each (torch profiler).

    python benchmarks/profile_train_step.py                    # 130M shape, batch 8 x 2048, bf16 autocast
    python benchmarks/profile_train_step.py --device cpu --tiny  # smoke test
    python benchmarks/profile_train_step.py --loss fused         # mambakit with the fused loss only

Both models get the same fp32 weights (ours loaded into the official through its state dict) and the same tokens;
the loss is the fp32 cross-entropy of the logits for both ("plain"); with --loss fused (or both, the default)
mambakit is also timed with the loss computed chunk by chunk without the logits (`forward(labels=...,
return_logits=False)`, `mambakit.ops.loss`: rows "mambakit, fused loss"); the official keeps the plain loss.
Prints ms per step (median of --repeats), peak GiB, and the top --top kernels of one step by total GPU time with
their call counts. Without the official package it runs mambakit alone and says so.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any, Optional

import torch
import torch.nn.functional as F

from _common import Rows, device_line, import_official, sync, table, time_ms
from mambakit import MambaConfig, MambaLMHeadModel


def ssm_cfg(arch: str) -> dict[str, Any]:
    return {"layer": "Mamba2", "d_state": 128, "headdim": 64} if arch == "mamba2" else {}


def kernel_breakdown(fn, top: int) -> list[tuple[str, float, int]]:
    """(name, total ms, calls) of the `top` GPU kernels of one call of fn, by total time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    total: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            total[e.name] += e.device_time_total / 1e3
            calls[e.name] += 1
    ranked = sorted(total, key=total.get, reverse=True)
    print(f"#   all kernels: {sum(total.values()):.2f} ms in {sum(calls.values())} launches")
    return [(n, total[n], calls[n]) for n in ranked[:top]]


def lm_loss(model, x, y, fused: bool):
    """The mean cross-entropy of the model's next-token predictions: from the logits, or fused (no logits)."""
    if fused:
        return model(x, labels=y, return_logits=False).loss
    logits = model(x).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def engine_name(name: str, fused: bool) -> str:
    return f"{name}, fused loss" if fused else name


def time_graphed(model, ids, args, arch: str, rows: Rows, fused: bool) -> None:
    """The same step (forward, fp32 cross-entropy, backward) replayed as one CUDA graph; its loss checked against
    the eager step's on a second batch."""
    from mambakit.training.cuda_graph import GraphedStep

    def loss_fn(x, y):
        return lm_loss(model, x, y, fused)

    model.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats()
    graphed = GraphedStep(loss_fn, model.parameters(), (ids[:, :-1], ids[:, 1:]), autocast_dtype=torch.bfloat16)
    other = torch.randint_like(ids, 0, args.vocab)
    got = graphed(other[:, :-1], other[:, 1:]).item()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = loss_fn(other[:, :-1], other[:, 1:]).item()
    ms = time_ms(lambda: graphed(ids[:, :-1], ids[:, 1:]), repeats=args.repeats * 4, warmup=2)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"# graphed step loss {got:.6f} vs eager {want:.6f}")
    rows.add(arch=arch, engine=engine_name("mambakit, CUDA graph", fused), loss="fused" if fused else "plain", ms=ms,
             peak_GiB=peak, batch=args.batch, seqlen=args.seqlen, d_model=args.d_model, n_layer=args.n_layer,
             loss_vs_eager=abs(got - want))
    del graphed
    model.zero_grad(set_to_none=True)


def time_loop(model, ids, args, arch: str, rows: Rows, name: str, fused: bool) -> None:
    """ms per step of args.loop back-to-back steps (forward, loss, backward, fused AdamW, zero_grad), one sync at
    the end, best of 3 rounds; mambakit with check_values on and off, interleaved. The update changes the weights:
    run after the other measurements of this model."""
    import time

    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=args.device == "cuda")

    def train_step():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = lm_loss(model, ids[:, :-1], ids[:, 1:], fused)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    checks = [True, False] if name == "mambakit" else [None]
    best = {c: float("inf") for c in checks}
    for _ in range(3):
        for check in checks:
            if check is not None:
                model.check_values = check
            train_step()
            sync()
            t0 = time.perf_counter()
            for _ in range(args.loop):
                train_step()
            sync()
            best[check] = min(best[check], (time.perf_counter() - t0) / args.loop * 1e3)
    for check, ms in best.items():
        engine = engine_name(name, fused) + (", check_values off" if check is False else "")
        rows.add(arch=arch, engine=engine, loss="fused" if fused else "plain", measure=f"loop of {args.loop} + AdamW",
                 ms=ms, batch=args.batch, seqlen=args.seqlen, d_model=args.d_model, n_layer=args.n_layer)
    if name == "mambakit":
        model.check_values = True
    del opt
    model.zero_grad(set_to_none=True)


def host_profile(step, top: int) -> None:
    """Print the host time of one step (from its start, on an idle GPU, until Python returns, not waiting for the
    GPU) and the `top` functions by own time under cProfile (the forward's: the backward runs on autograd's device
    threads, which cProfile does not see)."""
    import cProfile
    import pstats
    import time

    host = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
        sync()
    print(f"#   host ms per step (GPU not awaited): {sorted(host)[1]:.2f}")
    prof = cProfile.Profile()
    prof.enable()
    step()
    sync()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["mamba1", "mamba2"], choices=["mamba1", "mamba2"])
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=50277)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--no-official", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--loss", default="both", choices=["plain", "fused", "both"],
                    help="mambakit's loss: from the logits (plain), chunked without them (fused), or both rows")
    ap.add_argument("--graphed", action="store_true",
                    help="also time mambakit's step as one CUDA graph (mambakit.training.cuda_graph.GraphedStep)")
    ap.add_argument("--loop", type=int, default=0, metavar="N",
                    help="also time N back-to-back training steps with a fused AdamW update and one sync at the end "
                         "(what a training loop sees); mambakit with CausalLM.check_values on and off (off: no host "
                         "sync per step, as `mambakit train` runs)")
    ap.add_argument("--host", type=int, default=0,
                    help="also time the host side of mambakit's step (Python and launches, GPU not awaited) and "
                         "print the N functions with the most own time under cProfile")
    args = ap.parse_args(argv)
    if args.tiny:
        args.d_model, args.n_layer, args.batch, args.seqlen, args.vocab, args.repeats = 32, 2, 2, 64, 256, 1
    print(f"# {device_line()}")
    official = None if args.no_official or args.device != "cuda" else import_official()
    rows = Rows("train_step")
    for arch in args.archs:
        torch.manual_seed(0)
        cfg = dict(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab, ssm_cfg=ssm_cfg(arch))
        models = {"mambakit": MambaLMHeadModel(MambaConfig(**cfg), device=args.device)}
        if official is not None:
            theirs = official["LM"](official["Config"](**cfg, fused_add_norm=True), device=args.device)
            theirs.load_state_dict(models["mambakit"].state_dict(), strict=True)
            models["official"] = theirs
        ids = torch.randint(0, args.vocab, (args.batch, args.seqlen + 1), device=args.device)
        losses = {"plain": [False], "fused": [True], "both": [False, True]}[args.loss]
        runs = [(name, model, fused) for name, model in models.items()
                for fused in (losses if name == "mambakit" else [False])]
        for name, model, fused in runs:
            def step(model=model, fused=fused):
                with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
                    loss = lm_loss(model, ids[:, :-1], ids[:, 1:], fused)  # plain: cross_entropy runs in fp32
                loss.backward()
                model.zero_grad(set_to_none=True)
                return loss

            step()
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = time_ms(step, repeats=args.repeats, warmup=1)
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0
            rows.add(arch=arch, engine=engine_name(name, fused), loss="fused" if fused else "plain", measure="step",
                     ms=ms, peak_GiB=peak, batch=args.batch, seqlen=args.seqlen, d_model=args.d_model,
                     n_layer=args.n_layer)
            if args.device == "cuda":
                print(f"# {engine_name(name, fused)} {arch}: top kernels of one step (total ms, calls)")
                for kname, kms, kcalls in kernel_breakdown(step, args.top):
                    print(f"#   {kms:8.2f} ms {kcalls:5d}x  {kname[:140]}")
            if args.loop:
                time_loop(model, ids, args, arch, rows, name, fused)
            if args.host and name == "mambakit":
                host_profile(step, args.host)
            if args.graphed and name == "mambakit" and args.device == "cuda":
                time_graphed(model, ids, args, arch, rows, fused)
        del models
        if args.device == "cuda":
            torch.cuda.empty_cache()
    rows.save()
    print(table(rows.rows, ["arch", "engine", "loss", "measure", "ms", "peak_GiB", "batch", "seqlen"]))


if __name__ == "__main__":
    main()
