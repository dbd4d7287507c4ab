"""Decoding side by side with the official mamba_ssm: ms per one-token step of the whole batch through CUDA graphs.

    python benchmarks/bench_decode.py                         # GPU: the issue-20 table (130M shape, bf16)
    python benchmarks/bench_decode.py --shapes 1.4b --batches 1 16
    python benchmarks/bench_decode.py --device cpu --tiny     # the same code path, eager, tiny shapes (smoke test)
    python benchmarks/bench_decode.py --archs mamba2 mamba3 --no-official   # Mamba-3's step beside Mamba-2's

Both models get the same random weights (ours loaded into the official through its state dict, the names are the
same). Each is prefilled with the same prompt, then decodes greedily: the timed loop is graph replay + argmax +
the token feed, `--new-tokens` steps, prefill excluded (timed apart, `num_last_tokens=1`). The official decodes
through its own `update_graph_cache` (what `generate(cg=True)` uses); mambakit through `GraphedDecoder`.
Also reported: kernels per step (torch profiler over one eager step), achieved bytes/s over the weights (read once)
and the recurrent state (read and written), the floor that gives at --bandwidth, and how many greedy tokens of the
two agree. Without the official package it runs mambakit alone and says so; Mamba-3 (SISO, d_state 128, headdim 64)
always runs alone (the official's generate breaks: its issues #1014 and #1022).
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any, Callable, Optional

import torch

from _common import Rows, device_line, import_official, rel_err, sync, table
from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.models.cuda_graph import GraphedDecoder

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHAPES = {"130m": (768, 24), "1.4b": (2048, 48), "tiny": (64, 2)}


def ssm_cfg(arch: str) -> dict[str, Any]:
    if arch in ("mamba2", "mamba3"):
        return {"layer": arch.capitalize(), "d_state": 128, "headdim": 64}
    return {}


def build(arch: str, shape: str, vocab: int, device: str, dtype: torch.dtype, official) -> tuple[Any, Any]:
    d_model, n_layer = SHAPES[shape]
    torch.manual_seed(0)
    ours = MambaLMHeadModel(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, ssm_cfg=ssm_cfg(arch)),
                            device=device, dtype=dtype).eval()
    theirs = None
    if official is not None and arch != "mamba3":  # the official Mamba-3 generate breaks (its issues #1014, #1022)
        cfg = official["Config"](d_model=d_model, n_layer=n_layer, vocab_size=vocab, ssm_cfg=ssm_cfg(arch),
                                 rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8,
                                 tie_embeddings=True)
        theirs = official["LM"](cfg, device=device, dtype=dtype).eval()
        theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def state_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for s in cache.states for t in vars(s).values()
               if isinstance(t, torch.Tensor))


def count_kernels(fn: Callable[[], Any]) -> tuple[int, Counter, Counter]:
    """GPU kernels (and memsets/copies) one call of fn launches: (count, count by name, microseconds by name);
    (0, {}, {}) without CUDA."""
    if not torch.cuda.is_available():
        return 0, Counter(), Counter()
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    names = Counter(e.name for e in kernels)
    micros: Counter = Counter()
    for e in kernels:
        micros[e.name] += e.time_range.elapsed_us()
    return sum(names.values()), names, micros


# ----------------------------------------------------------------------------------------------------------------------
class OursDecoder:
    def __init__(self, model, batch: int, graph: bool, state_dtype: Optional[torch.dtype] = None):
        self.model, self.batch, self.graph, self.state_dtype = model, batch, graph, state_dtype
        self.dec = GraphedDecoder(model, batch, state_dtype=state_dtype) if graph else None
        self.cache = self.dec.cache if graph else model.allocate_cache(batch, state_dtype=state_dtype)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        if self.graph:
            return self.dec.prefill(ids)
        self.cache = self.model.allocate_cache(self.batch, state_dtype=self.state_dtype)
        return self.model(ids, cache=self.cache, num_last_tokens=1).logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dec.step(tokens) if self.graph else self.model.step(tokens, self.cache)

    def eager_step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.step(tokens, self.cache)


class OfficialDecoder:
    def __init__(self, model, official, batch: int, max_seqlen: int):
        self.model, self.batch, self.max_seqlen = model, batch, max_seqlen
        self.cg = official["update_graph_cache"](model, None, batch, seqlen_og=1, max_seqlen=max_seqlen)
        self.ip = self.cg.inference_params

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.ip.reset(self.max_seqlen, self.batch)
        logits = self.model(ids, inference_params=self.ip, num_last_tokens=1).logits[:, -1]
        self.ip.seqlen_offset += ids.shape[1]
        return logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.full((self.batch, 1), self.ip.seqlen_offset, dtype=torch.long, device=tokens.device)
        logits = self.cg.run(tokens[:, None], pos, self.ip.seqlen_offset).squeeze(1)
        self.ip.seqlen_offset += 1
        return logits

    @torch.inference_mode()
    def eager_step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens[:, None], inference_params=self.ip, num_last_tokens=1).logits[:, -1]
        self.ip.seqlen_offset += 1
        return logits


def greedy(dec, logits: torch.Tensor, n: int) -> torch.Tensor:
    toks = []
    tok = logits.argmax(-1)
    for _ in range(n):
        toks.append(tok)
        tok = dec.step(tok).argmax(-1)
    return torch.stack(toks, 1)


def timed_decode(dec, logits: torch.Tensor, n: int) -> float:
    """ms per step of `n` greedy steps (after 3 untimed ones), synchronised around the whole loop."""
    tok = logits.argmax(-1)
    for _ in range(3):
        tok = dec.step(tok).argmax(-1)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        tok = dec.step(tok).argmax(-1)
    sync()
    return (time.perf_counter() - t0) * 1e3 / n


def timed_prefill(dec, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    dec.prefill(ids)  # warm (and first-call compiles)
    sync()
    t0 = time.perf_counter()
    logits = dec.prefill(ids)
    sync()
    return (time.perf_counter() - t0) * 1e3, logits


def run_case(rows: Rows, args, arch: str, shape: str, batch: int, ours, theirs, official) -> None:
    vocab = ours.config.padded_vocab_size
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, ours.config.vocab_size, (batch, args.prompt), generator=g).to(args.device)
    max_seqlen = args.prompt + args.new_tokens + 64
    wbytes = weight_bytes(ours)
    engines: dict[str, Any] = {}
    for state_dtype in args.state_dtypes:
        name = "mambakit" if state_dtype == "fp32" else f"mambakit {state_dtype} state"
        engines[name] = OursDecoder(ours, batch, graph=args.device == "cuda", state_dtype=DTYPES[state_dtype])
    if theirs is not None:
        engines["official"] = OfficialDecoder(theirs, official, batch, max_seqlen)
    tokens, compared = {}, {}
    for name, dec in engines.items():
        prefill_ms, logits = timed_prefill(dec, ids)
        t0 = compared["mambakit"][0].argmax(-1) if compared else logits.argmax(-1)
        compared[name] = (logits.float().clone(), dec.step(t0).float().clone())
        logits = dec.prefill(ids)
        tokens[name] = greedy(dec, logits, args.check_tokens)
        logits = dec.prefill(ids)
        ms = timed_decode(dec, logits, args.new_tokens)
        n_kernels, names, micros = count_kernels(lambda: dec.eager_step(logits.argmax(-1)))
        sbytes = state_bytes(dec.cache if isinstance(dec, OursDecoder) else ours.allocate_cache(batch))
        floor_ms = (wbytes + 2 * sbytes) / (args.bandwidth * 1e9) * 1e3
        rows.add(arch=arch, shape=shape, batch=batch, engine=name, ms_per_step=ms, tokens_per_s=batch / ms * 1e3,
                 prefill_ms=prefill_ms, kernels_per_step=n_kernels, floor_ms=floor_ms, floor_ratio=ms / floor_ms,
                 achieved_GBps=(wbytes + 2 * sbytes) / ms / 1e6, dtype=str(args.dtype))
        if args.kernel_names:
            print(f"# {name} {arch} {shape} b{batch}: {n_kernels} kernels per eager step")
            print(f"#   count  total us  kernel (the {args.kernel_names} longest in all; "
                  f"{sum(micros.values()):.1f} us of kernels in the eager step)")
            for k, us in micros.most_common(args.kernel_names):
                print(f"#   {names[k]:4d}  {us:8.1f}  {k[:140]}")
    first = next(iter(compared))
    for name in list(tokens)[1:]:
        if name != "official":
            agree = int((tokens[name] == tokens[first]).all(0).long().cumprod(0).sum())
            print(f"# {arch} {shape} b{batch}: {name}: first-step logits rel err vs {first} "
                  f"{rel_err(compared[name][1], compared[first][1]):.2e}; greedy tokens identical for the first "
                  f"{agree} of {args.check_tokens} steps in every row")
    if "official" in tokens:
        (p_ours, s_ours), (p_off, s_off) = compared[first], compared["official"]
        print(f"# {arch} {shape} b{batch}: logits rel err vs official: prefill {rel_err(p_ours, p_off):.2e}, "
              f"first step {rel_err(s_ours, s_off):.2e}")
        same = (tokens[first] == tokens["official"]).all(0)
        agree = int(same.long().cumprod(0).sum())
        print(f"# {arch} {shape} b{batch}: greedy tokens identical for the first {agree} of {args.check_tokens} "
              f"steps in every row")
        ours_tok, off_tok = p_ours.argmax(-1), p_off.argmax(-1)
        differ = (ours_tok != off_tok).nonzero().flatten()
        if len(differ):  # near-ties or a real error: how far apart are the two tokens in each package's logits?
            gap_off = (p_off[differ, off_tok[differ]] - p_off[differ, ours_tok[differ]]).abs().max().item()
            gap_ours = (p_ours[differ, ours_tok[differ]] - p_ours[differ, off_tok[differ]]).abs().max().item()
            err = (p_ours - p_off).abs().max().item()
            print(f"# {arch} {shape} b{batch}: first token differs in {len(differ)} of {batch} rows; the two tokens' "
                  f"logit gap: at most {gap_off:.3g} (official), {gap_ours:.3g} (mambakit); largest logit "
                  f"difference between the packages {err:.3g}")
    del engines
    torch.cuda.empty_cache() if args.device == "cuda" else None


def run_contexts(rows: Rows, args, arch: str, ours, theirs, official) -> None:
    for ctx in args.contexts:
        ids = torch.randint(0, ours.config.vocab_size, (1, ctx), device=args.device)
        engines = {"mambakit": OursDecoder(ours, 1, graph=True)}
        if theirs is not None:
            engines["official"] = OfficialDecoder(theirs, official, 1, ctx + 200)
        for name, dec in engines.items():
            logits = dec.prefill(ids)
            rows.add(arch=arch, shape="130m", batch=1, engine=name, context=ctx,
                     ms_per_step=timed_decode(dec, logits, 64))
        del engines


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["mamba1", "mamba2"], choices=["mamba1", "mamba2", "mamba3"])
    ap.add_argument("--shapes", nargs="+", default=["130m"], choices=sorted(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--check-tokens", type=int, default=32)
    ap.add_argument("--contexts", nargs="*", type=int, default=[], help="batch-1 latency at these context lengths")
    ap.add_argument("--vocab", type=int, default=50277)
    ap.add_argument("--bandwidth", type=float, default=4100.0, help="GB/s for the floor (H200 copy rate)")
    ap.add_argument("--kernel-names", type=int, default=0,
                    help="print the N kernels taking the most time per eager step (count, total us)")
    ap.add_argument("--state-dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
                    help="mambakit's SSM-state dtypes, one engine each (the official keeps the model dtype)")
    ap.add_argument("--no-official", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="weights and activations (default: bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--gemv-max-batch", type=int, default=None,
                    help="set mambakit.ops.norm_linear.GEMV_MAX_BATCH (the norm-fused GEMV kernels up to this batch)")
    ap.add_argument("--m2-conv-in-step", action=argparse.BooleanOptionalAction, default=None,
                    help="Mamba-2's Triton step as one kernel (the conv inside the state step) or as two (default: "
                         "the library's setting, mambakit.ops.mixer_step.M2_CONV_IN_STEP)")
    ap.add_argument("--m2-norm-in-step", action=argparse.BooleanOptionalAction, default=None,
                    help="with --m2-conv-in-step, the gated RMSNorm inside that kernel beyond the GEMV batch "
                         "(default: mambakit.ops.mixer_step.M2_NORM_IN_STEP)")
    ap.add_argument("--plain-gemv", action=argparse.BooleanOptionalAction, default=None,
                    help="send plain projections to the GEMV kernel too, or not (default: the library's setting, "
                         "mambakit.ops.norm_linear.PLAIN_GEMV)")
    args = ap.parse_args(argv)
    import mambakit.ops.norm_linear as norm_linear

    if args.gemv_max_batch is not None:
        norm_linear.GEMV_MAX_BATCH = args.gemv_max_batch
    if args.plain_gemv is not None:
        norm_linear.PLAIN_GEMV = args.plain_gemv
    import mambakit.ops.mixer_step as mixer_step

    if args.m2_conv_in_step is not None:
        mixer_step.M2_CONV_IN_STEP = args.m2_conv_in_step
    if args.m2_norm_in_step is not None:
        mixer_step.M2_NORM_IN_STEP = args.m2_norm_in_step
    args.dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    if args.tiny:
        args.shapes, args.prompt, args.new_tokens, args.check_tokens, args.vocab = ["tiny"], 16, 4, 4, 256
        args.batches = [b for b in args.batches if b <= 2] or [1]
    print(f"# {device_line()}")
    print(f"# GEMV_MAX_BATCH={norm_linear.GEMV_MAX_BATCH} PLAIN_GEMV={norm_linear.PLAIN_GEMV} "
          f"M2_CONV_IN_STEP={mixer_step.M2_CONV_IN_STEP} M2_NORM_IN_STEP={mixer_step.M2_NORM_IN_STEP}")
    official = None if args.no_official or args.device != "cuda" else import_official()
    rows = Rows("decode")
    for shape in args.shapes:
        for arch in args.archs:
            ours, theirs = build(arch, shape, args.vocab, args.device, args.dtype, official)
            for batch in args.batches:
                try:
                    run_case(rows, args, arch, shape, batch, ours, theirs, official)
                except Exception as exc:  # one failure must not hide the other numbers
                    print(f"# {arch} {shape} b{batch} failed: {type(exc).__name__}: {exc}")
            if args.contexts and shape == "130m":
                run_contexts(rows, args, arch, ours, theirs, official)
            del ours, theirs
    rows.save()
    main_rows = [r for r in rows.rows if "context" not in r]
    by_key = {(r["arch"], r["shape"], r["batch"], r["engine"]): r for r in main_rows}
    for r in main_rows:
        ref = by_key.get((r["arch"], r["shape"], r["batch"], "official"))
        r["vs_official"] = (ref["ms_per_step"] / r["ms_per_step"]) if ref else None
    print(table(main_rows, ["arch", "shape", "batch", "engine", "ms_per_step", "tokens_per_s", "vs_official",
                            "kernels_per_step", "prefill_ms", "floor_ms", "floor_ratio", "achieved_GBps"]))
    ctx_rows = [r for r in rows.rows if "context" in r]
    if ctx_rows:
        print(table(ctx_rows, ["arch", "engine", "context", "ms_per_step"]))


if __name__ == "__main__":
    main()
