"""CPU benchmark: a 4-layer d_model=256 Mamba LM, forward and forward+backward, side by side with its peers.

Implementations (each timed in a fresh subprocess so its peak RSS is its own):
  mambakit      our chunked selective scan (the default CPU path)
  mambakit-ref  our sequential reference loop (the definition; slow)
  hf            transformers MambaForCausalLM, its plain PyTorch path (sequential loop)
  hf-mambapy    transformers MambaForCausalLM with use_mambapy=True (parallel scan in training)
  mambapy       mambapy 1.2.0's Mamba stack (Blelloch pscan) with an embedding and a tied head

    python benchmarks/bench_cpu.py                         # seqlen 512 1024 2048, batch 2
    python benchmarks/bench_cpu.py --seqlens 2048 --impls mambakit mambapy

Slow variants above --max-slow-tokens (batch * seqlen) are skipped for forward+backward and marked "skip".
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

D_MODEL, N_LAYER, VOCAB = 256, 4, 256
IMPLS = ("mambakit", "mambakit-ref", "hf", "hf-mambapy", "mambapy")
SLOW = {"mambakit-ref", "hf"}  # sequential loops (Mamba-1); transformers' Mamba-2 torch path is chunked


def build(impl: str, arch: str):
    import torch
    import torch.nn as nn

    if impl.startswith("mambakit"):
        from mambakit import MambaConfig, MambaLMHeadModel

        ssm_cfg = {"layer": "Mamba2", "d_state": 64, "headdim": 64, "chunk_size": 256} if arch == "mamba2" else {}
        if impl == "mambakit-ref":
            ssm_cfg["scan_backend"] = "ref"
        model = MambaLMHeadModel(MambaConfig(d_model=D_MODEL, n_layer=N_LAYER, vocab_size=VOCAB, ssm_cfg=ssm_cfg))
        return lambda ids: model(ids).logits, model
    if impl in ("hf", "hf-mambapy"):
        if arch == "mamba2":
            from transformers import Mamba2Config, Mamba2ForCausalLM

            cfg = Mamba2Config(hidden_size=D_MODEL, num_hidden_layers=N_LAYER, vocab_size=VOCAB, state_size=64,
                               head_dim=64, num_heads=2 * D_MODEL // 64, n_groups=1, chunk_size=256)
            model = Mamba2ForCausalLM(cfg)
        else:
            from transformers import MambaConfig as HFConfig, MambaForCausalLM

            model = MambaForCausalLM(HFConfig(hidden_size=D_MODEL, num_hidden_layers=N_LAYER, vocab_size=VOCAB,
                                              use_mambapy=(impl == "hf-mambapy")))
        return lambda ids: model(ids, use_cache=False).logits, model
    if impl == "mambapy":
        from mambapy.mamba import Mamba, MambaConfig as PyConfig, RMSNorm

        class LM(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(VOCAB, D_MODEL)
                self.mamba = Mamba(PyConfig(d_model=D_MODEL, n_layers=N_LAYER))
                self.norm = RMSNorm(D_MODEL)

            def forward(self, ids):
                return self.norm(self.mamba(self.emb(ids))) @ self.emb.weight.T

        model = LM()
        return model, model
    raise ValueError(impl)


def run_one(impl: str, arch: str, batch: int, seqlen: int, mode: str, repeats: int, threads: int, cpu_time: bool,
            queue) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    clock = time.process_time if cpu_time else time.perf_counter
    torch.manual_seed(0)
    fn, model = build(impl, arch)
    ids = torch.randint(0, VOCAB, (batch, seqlen))

    def once():
        if mode == "fwd":
            with torch.no_grad():
                fn(ids)
        else:
            model.zero_grad(set_to_none=True)
            fn(ids).float().logsumexp(-1).mean().backward()

    once()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = clock()
        once()
        times.append(clock() - t0)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"time": min(times), "rss_mb": rss_mb})


def measure(impl, arch, batch, seqlen, mode, repeats, threads=0, cpu_time=False):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=run_one, args=(impl, arch, batch, seqlen, mode, repeats, threads, cpu_time, q))
    p.start()
    p.join()
    return q.get() if p.exitcode == 0 and not q.empty() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("mamba1", "mamba2"), default="mamba1")
    ap.add_argument("--impls", nargs="+", default=None)
    ap.add_argument("--seqlens", nargs="+", type=int, default=[512, 1024, 2048])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-slow-tokens", type=int, default=1024,
                    help="skip forward+backward of the sequential-loop variants above batch*seqlen tokens")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = torch's default)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by process CPU time (robust on a shared machine; use with --threads 1)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    impls = args.impls or (["mambakit", "hf"] if args.arch == "mamba2" else list(IMPLS))
    import torch

    threads = args.threads or torch.get_num_threads()
    print(f"# {args.arch} LM, d_model {D_MODEL}, {N_LAYER} layers, batch {args.batch}, "
          f"fp32, torch {torch.__version__}, "
          f"{threads} threads, {'process CPU time' if args.cpu_time else 'wall time'}")
    results = {}
    for seqlen in args.seqlens:
        for mode in ("fwd", "fwd+bwd"):
            for impl in impls:
                slow = (impl in SLOW and args.arch == "mamba1" and mode == "fwd+bwd"
                        and args.batch * seqlen > args.max_slow_tokens)
                r = None if slow else measure(impl, args.arch, args.batch, seqlen, mode, args.repeats, args.threads,
                                              args.cpu_time)
                results[(seqlen, mode, impl)] = r
                print(f"  measured {impl:13s} {mode:8s} L={seqlen}: "
                      + (f"{r['time']:.3f} s, peak RSS {r['rss_mb']:.0f} MB" if r else "skip"), flush=True)
    print()
    header = f"| seqlen | mode | " + " | ".join(impls) + " | best peer / mambakit |"
    print(header)
    print("|" + "---|" * (len(impls) + 3))
    for seqlen in args.seqlens:
        for mode in ("fwd", "fwd+bwd"):
            ours = results[(seqlen, mode, "mambakit")]
            cells, peers = [], []
            for impl in impls:
                r = results[(seqlen, mode, impl)]
                cells.append(f"{r['time']:.3f} s ({r['rss_mb']:.0f} MB)" if r else "skip")
                if r and impl not in ("mambakit", "mambakit-ref"):
                    peers.append(r["time"])
            ratio = f"{min(peers) / ours['time']:.2f}x" if peers and ours else "-"
            print(f"| {seqlen} | {mode} | " + " | ".join(cells) + f" | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k[0]}/{k[1]}/{k[2]}": v for k, v in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
