"""Generation: the 130M-shape Mamba LM against a same-size Transformer, both decoding from a CUDA graph.

    python benchmarks/bench_generate.py                      # GPU: the numbers of benchmarks/RESULTS.md (issue 5)
    python benchmarks/bench_generate.py --device cpu --tiny  # the same code path, eager, tiny shapes (a smoke test)

Mamba: d_model 768, 24 layers, vocab 50277 (mambakit MambaLMHeadModel, random weights); the one-token step captured
by `mambakit.models.cuda_graph.GraphedDecoder`.
Transformer: transformers' GPTNeoXForCausalLM with the Pythia-160M shape (hidden 768, 12 layers, 12 heads,
intermediate 3072, rotary_pct 0.25, vocab 50304, random weights), attn_implementation="sdpa", a `StaticCache`
sized to the context + the new tokens, and its one-token forward captured in a CUDA graph here (a static token
buffer; positions read from the cache's own length counter on the device; a boolean (1, 1, 1, max_len) mask of the
filled cache positions built inside the graph, which is the mask transformers builds itself for a static cache).

Measured (greedy decoding, argmax and the token feed included in the timed loop):
  1. prompt --prompt (2048) + --new-tokens (128) at batch 1, 16, 64: prefill time (reported apart), per-token latency
     (one step of the whole batch) and generated tokens/s; Mamba's eager step too.
  2. per-token latency against the context length (1K .. 32K) at batch 1 and 16. Mamba: a real prefill of that many
     tokens. Transformer: the static cache filled with random keys/values up to that length (a decode step reads the
     same bytes whatever their values; a real prefill of 16 x 32K tokens would cost minutes).
  3. graph vs eager greedy tokens (Mamba: `generate(cuda_graph=True)` vs `generate()`; Transformer: our capture vs
     its eager static-cache step), printed as identical or not.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from typing import Callable, Optional

import torch
from torch import Tensor

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.models.cuda_graph import GraphedDecoder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------------
# Mamba
class EagerMambaDecoder:
    """GraphedDecoder's interface over plain eager steps (the CPU smoke test and the eager reference)."""

    def __init__(self, model: MambaLMHeadModel, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.cache = model.allocate_cache(batch_size)

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> Tensor:
        self.cache = self.model.allocate_cache(self.batch_size)
        return self.model(input_ids, cache=self.cache, num_last_tokens=1).logits[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        return self.model.step(tokens, self.cache)


def build_mamba(args, device: torch.device, dtype: torch.dtype) -> MambaLMHeadModel:
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab)
    return MambaLMHeadModel(cfg, device=device, dtype=dtype).eval()


def mamba_decoder(model, batch: int, graph: bool):
    return GraphedDecoder(model, batch) if graph else EagerMambaDecoder(model, batch)


# ----------------------------------------------------------------------------------------------------------------------
# Transformer
def build_transformer(args, device: torch.device, dtype: torch.dtype):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=args.tf_vocab, hidden_size=args.d_model, num_hidden_layers=args.tf_layers,
                        num_attention_heads=args.tf_heads, intermediate_size=4 * args.d_model, rotary_pct=0.25,
                        max_position_embeddings=max(args.contexts + [args.prompt]) + args.new_tokens + 64,
                        use_parallel_residual=True, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = GPTNeoXForCausalLM(cfg)
    return model.to(dtype=dtype).eval()


class TransformerDecoder:
    """A static KV cache of max_len positions; the one-token forward eager or captured in a CUDA graph."""

    def __init__(self, model, batch_size: int, max_len: int, graph: bool, library_step: bool = False):
        from transformers import StaticCache

        self.model, self.batch_size, self.max_len, self.graph = model, batch_size, max_len, None
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.positions = torch.arange(max_len, device=self.device)
        self.want_graph = graph
        self.library_step = library_step  # eager only: let transformers build the positions and the mask itself
        self.logits: Optional[Tensor] = None

    def _length(self) -> Tensor:
        return self.cache.layers[0].cumulative_length  # tokens in the cache, a device tensor the cache updates

    @torch.no_grad()
    def _forward(self) -> Tensor:
        if self.library_step:
            return self.model(input_ids=self.tokens, past_key_values=self.cache, use_cache=True).logits[:, -1]
        seen = self._length()
        mask = (self.positions <= seen).view(1, 1, 1, self.max_len)  # the cache slots up to and including this token
        pos = seen.view(1, 1).expand(self.batch_size, 1)
        out = self.model(input_ids=self.tokens, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                         use_cache=True)
        return out.logits[:, -1]

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> Tensor:
        self.cache.reset()
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        self._ensure_graph()
        return logits

    @torch.no_grad()
    def fill_random(self, length: int) -> None:
        """Make the cache hold `length` tokens of random keys/values (for latency against context length)."""
        self.cache.reset()
        # allocates the cache tensors
        self.model(input_ids=self.tokens, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        for layer in self.cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
        self._set_length(length)
        self._ensure_graph()

    def _set_length(self, length: int) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)

    def _ensure_graph(self) -> None:
        if not self.want_graph or self.graph is not None:
            return
        length = int(self._length())
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        self._set_length(length)  # the warm-up and capture wrote at positions >= length: they are overwritten later
        sync(self.device)

    def step(self, tokens: Tensor) -> Tensor:
        self.tokens.copy_(tokens.view(-1, 1))
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits


# ----------------------------------------------------------------------------------------------------------------------
def decode_loop(step: Callable[[Tensor], Tensor], logits: Tensor, n: int, device: torch.device) -> tuple[float, Tensor]:
    """n greedy steps from the prefill's last logits; returns (seconds per step, the (batch, n + 1) tokens)."""
    out = torch.empty(logits.shape[0], n + 1, dtype=torch.long, device=device)
    tok = logits.argmax(-1)
    out[:, 0] = tok
    sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        tok = step(tok).argmax(-1)
        out[:, i + 1] = tok
    sync(device)
    return (time.perf_counter() - t0) / n, out


def timed_prefill(dec, ids: Tensor, device: torch.device) -> tuple[float, Tensor]:
    sync(device)
    t0 = time.perf_counter()
    logits = dec.prefill(ids)
    sync(device)
    return time.perf_counter() - t0, logits


def fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def throughput(args, device, dtype, mamba, tf, results: dict) -> None:
    print(f"\n## prompt {args.prompt} + {args.new_tokens} generated tokens (greedy), {args.dtype}", flush=True)
    rows = []
    for batch in args.batches:
        row = {"batch": batch}
        g = torch.Generator(device="cpu").manual_seed(batch)
        ids = torch.randint(0, args.vocab, (batch, args.prompt), generator=g).to(device)
        try:
            dec = mamba_decoder(mamba, batch, args.graph)
            for _ in range(2):  # the first round warms the prefill kernels; keep the second
                row["mamba_prefill_s"], logits = timed_prefill(dec, ids, device)
                row["mamba_step_s"], _ = decode_loop(dec.step, logits, args.new_tokens, device)
            eager = EagerMambaDecoder(mamba, batch)
            logits = eager.prefill(ids)
            row["mamba_eager_step_s"], _ = decode_loop(eager.step, logits, min(args.new_tokens, 32), device)
            del dec, eager
        except torch.cuda.OutOfMemoryError:
            row["mamba_error"] = "OOM"
        torch.cuda.empty_cache() if device.type == "cuda" else None
        try:
            dec = TransformerDecoder(tf, batch, args.prompt + args.new_tokens + 1, args.graph)
            for _ in range(2):
                row["tf_prefill_s"], logits = timed_prefill(dec, ids, device)
                row["tf_step_s"], _ = decode_loop(dec.step, logits, args.new_tokens, device)
            del dec
        except torch.cuda.OutOfMemoryError:
            row["tf_error"] = "OOM"
        torch.cuda.empty_cache() if device.type == "cuda" else None
        rows.append(row)
        print(f"  batch {batch}: {row}", flush=True)
    results["throughput"] = rows
    print(f"\n| batch | Mamba prefill s | Mamba ms/token | Mamba tokens/s | Mamba eager ms/token "
          f"| Transformer prefill s "
          f"| Transformer ms/token | Transformer tokens/s | throughput ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, t = r.get("mamba_step_s"), r.get("tf_step_s")
        mt = r["batch"] / m if m else None
        tt = r["batch"] / t if t else None
        ratio = f"{mt / tt:.2f}x" if mt and tt else "—"
        print(f"| {r['batch']} | {fmt(r.get('mamba_prefill_s'), '.3f')} | {fmt(m and m * 1e3)} | {fmt(mt, ',.0f')} | "
              f"{fmt(r.get('mamba_eager_step_s') and r['mamba_eager_step_s'] * 1e3)} | "
              f"{fmt(r.get('tf_prefill_s'), '.3f')} | {fmt(t and t * 1e3)} | {fmt(tt, ',.0f')} | {ratio} |")


def latency_sweep(args, device, dtype, mamba, tf, results: dict) -> None:
    print(f"\n## per-token latency against context length ({args.sweep_steps} steps, median of {args.repeats})",
          flush=True)
    table = {}
    for batch in args.sweep_batches:
        mdec = mamba_decoder(mamba, batch, args.graph)
        for ctx in args.contexts:
            row = table.setdefault((batch, ctx), {"batch": batch, "context": ctx})
            g = torch.Generator(device="cpu").manual_seed(ctx)
            try:
                ids = torch.randint(0, args.vocab, (batch, ctx), generator=g).to(device)
                row["mamba_prefill_s"], logits = timed_prefill(mdec, ids, device)
                del ids
                times = []
                for _ in range(args.repeats):
                    t, _ = decode_loop(mdec.step, logits, args.sweep_steps, device)
                    times.append(t)
                row["mamba_step_s"] = statistics.median(times)
            except torch.cuda.OutOfMemoryError:
                row["mamba_error"] = "OOM"
            torch.cuda.empty_cache() if device.type == "cuda" else None
            try:
                tdec = TransformerDecoder(tf, batch, ctx + args.sweep_steps * args.repeats + 8, args.graph)
                times = []
                for _ in range(args.repeats):
                    tdec.fill_random(ctx)
                    logits = tdec.step(torch.zeros(batch, dtype=torch.long, device=device)).clone()
                    t, _ = decode_loop(tdec.step, logits, args.sweep_steps, device)
                    times.append(t)
                row["tf_step_s"] = statistics.median(times)
                del tdec
            except torch.cuda.OutOfMemoryError:
                row["tf_error"] = "OOM"
                tdec = None
            torch.cuda.empty_cache() if device.type == "cuda" else None
            print(f"  {row}", flush=True)
        del mdec
    results["latency_vs_context"] = list(table.values())
    for batch in args.sweep_batches:
        print(f"\n| context (batch {batch}) | Mamba ms/token | Transformer ms/token | Transformer / Mamba |")
        print("|---|---|---|---|")
        for ctx in args.contexts:
            r = table[(batch, ctx)]
            m, t = r.get("mamba_step_s"), r.get("tf_step_s")
            ratio = f"{t / m:.2f}x" if m and t else "—"
            print(f"| {ctx} | {fmt(m and m * 1e3, '.3f') if m else r.get('mamba_error', '—')} | "
                  f"{fmt(t and t * 1e3, '.3f') if t else r.get('tf_error', '—')} | {ratio} |")


def identical_tokens(args, device, mamba, tf, results: dict) -> None:
    batch, n = args.check_batch, args.check_tokens
    g = torch.Generator(device="cpu").manual_seed(7)
    ids = torch.randint(0, args.vocab, (batch, args.check_prompt), generator=g).to(device)
    eager = mamba.generate(ids, n, temperature=0)
    graphed = mamba.generate(ids, n, temperature=0, cuda_graph=args.graph)
    same = bool(torch.equal(eager, graphed))
    print(f"\nMamba greedy tokens, generate(cuda_graph={args.graph}) vs eager generate(), batch {batch}, prompt "
          f"{args.check_prompt}, {n} new: {'IDENTICAL' if same else 'DIFFERENT'}", flush=True)
    if not same:
        diff = (eager != graphed).nonzero()
        print(f"  first difference at {diff[0].tolist()}, {len(diff)} differing positions")
    results["mamba_graph_vs_eager_identical"] = same
    toks, logits_seq = [], []
    runs = (("library eager", False, True, None), ("ours eager", False, False, None), ("ours eager again", False,
            False, None), ("ours graph", args.graph, False, None), ("ours graph, teacher-forced", args.graph, False, 1))
    for _, graph, library, forced in runs:
        dec = TransformerDecoder(tf, batch, args.check_prompt + n + 1, graph, library_step=library)
        logits = dec.prefill(ids)
        if forced is None:
            _, out = decode_loop(dec.step, logits, n, device)
            toks.append(out)
        else:  # feed the eager run's tokens and keep the logits, to compare numbers rather than argmaxes
            seq = [logits.float()]
            for i in range(n):
                seq.append(dec.step(toks[forced][:, i]).float().clone())
            logits_seq.append(torch.stack(seq))
        del dec
    eager_logits = []
    dec = TransformerDecoder(tf, batch, args.check_prompt + n + 1, False)
    eager_logits.append(dec.prefill(ids).float())
    for i in range(n):
        eager_logits.append(dec.step(toks[1][:, i]).float().clone())
    eager_logits = torch.stack(eager_logits)
    del dec
    rel = float((logits_seq[0] - eager_logits).abs().max() / eager_logits.abs().max())

    def verdict(a: Tensor, b: Tensor) -> str:
        if torch.equal(a, b):
            return "IDENTICAL"
        cols = (a != b).any(0).nonzero()
        return f"DIFFERENT (first at generated token {int(cols[0])} of {a.shape[1]})"

    print("Transformer greedy tokens (fp16 random weights: near-ties in the logits make argmax fragile):")
    for i, (name, *_) in enumerate(runs[1:4], start=1):
        print(f"  {name} vs {runs[0][0] if i == 1 else runs[1][0]}: {verdict(toks[i], toks[0 if i == 1 else 1])}")
    print(f"  teacher-forced logits, ours graph vs ours eager: max |diff| / max |logit| = {rel:.2e}", flush=True)
    results["transformer_tokens"] = {runs[i][0]: verdict(toks[i], toks[0 if i == 1 else 1]) for i in (1, 2, 3)}
    results["transformer_graph_vs_eager_logits_rel"] = rel


def profile_steps(args, device, mamba, tf, results: dict) -> None:
    """Kernels launched by one eager step (what the graph replays) and their summed device time, batch 1."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, args.vocab, (1, args.prompt), device=device)
    mdec = EagerMambaDecoder(mamba, 1)
    tdec = TransformerDecoder(tf, 1, args.prompt + 16, graph=False)
    for name, dec in (("mamba", mdec), ("transformer", tdec)):
        tok = dec.prefill(ids).argmax(-1)
        for _ in range(3):
            dec.step(tok)
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dec.step(tok)
            sync(device)
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.device_time for e in events)
        by_name: dict = {}
        for e in events:
            n, t = by_name.get(e.name, (0, 0.0))
            by_name[e.name] = (n + 1, t + e.device_time)
        top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:10]
        print(f"\n{name} eager step, batch 1: {len(events)} kernels, {total / 1e3:.3f} ms summed device time")
        for k, (n, t) in top:
            print(f"  {n:4d} x {t / 1e3:7.3f} ms  {k[:100]}")
        results[f"profile_{name}"] = {"kernels": len(events), "device_ms": total / 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test; with --device cpu: eager steps)")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--sweep-batches", default="1,16")
    ap.add_argument("--sweep-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: check,throughput,sweep,profile")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.sweep_batches = [int(b) for b in args.sweep_batches.split(",")]
    args.d_model, args.n_layer, args.vocab = 768, 24, 50277
    args.tf_layers, args.tf_heads, args.tf_vocab = 12, 12, 50304
    args.check_batch, args.check_prompt, args.check_tokens = 16, 2048, 128
    if args.tiny:
        args.d_model, args.n_layer, args.vocab, args.tf_layers, args.tf_heads, args.tf_vocab = 64, 2, 100, 2, 4, 128
        args.prompt, args.new_tokens, args.sweep_steps, args.repeats = 16, 8, 4, 2
        args.batches, args.contexts, args.sweep_batches = [1, 3], [8, 32], [1, 2]
        args.check_batch, args.check_prompt, args.check_tokens = 2, 12, 8
    args.graph = device.type == "cuda"
    skip = set(filter(None, args.skip.split(",")))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import transformers

    print(f"# {name}, torch {torch.__version__}, transformers {transformers.__version__}, {args.dtype}, "
          f"decode steps {'captured in CUDA graphs' if args.graph else 'eager (no CUDA)'}", flush=True)
    t0 = time.perf_counter()
    mamba = build_mamba(args, device, dtype)
    tf = build_transformer(args, device, dtype)
    n_m = sum(p.numel() for p in mamba.parameters())
    n_t = sum(p.numel() for p in tf.parameters())
    print(f"Mamba: d_model {args.d_model}, {args.n_layer} layers, {n_m / 1e6:.1f}M parameters; Transformer "
          f"(GPT-NeoX): hidden {args.d_model}, {args.tf_layers} layers, {args.tf_heads} heads, {n_t / 1e6:.1f}M "
          f"parameters (untied embeddings); built in {time.perf_counter() - t0:.1f} s", flush=True)
    results: dict = {"device": name, "dtype": args.dtype, "torch": torch.__version__,
                     "transformers": transformers.__version__, "graph": args.graph}
    parts = [("check", lambda: identical_tokens(args, device, mamba, tf, results)),
             ("throughput", lambda: throughput(args, device, dtype, mamba, tf, results)),
             ("sweep", lambda: latency_sweep(args, device, dtype, mamba, tf, results))]
    if device.type == "cuda":
        parts.append(("profile", lambda: profile_steps(args, device, mamba, tf, results)))
    for part, run in parts:
        if part in skip:
            continue
        try:  # one failing part must not hide the others' numbers
            run()
        except Exception:
            traceback.print_exc()
            results[f"{part}_error"] = traceback.format_exc(limit=3)
        if args.out:  # written after every part, so a later crash or time-out keeps what was measured
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
