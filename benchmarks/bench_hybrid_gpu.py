"""GPU: transformers hybrids (Bamba, Nemotron-H) run by mambakit beside transformers' own models, both loaded from the
same saved checkpoint folder in the same process.

    python benchmarks/bench_hybrid_gpu.py                          # GPU: d_model 2048, 16 layers, bf16, random weights
    python benchmarks/bench_hybrid_gpu.py --models bamba --skip-train
    python benchmarks/bench_hybrid_gpu.py --tiny                   # CPU smoke: tiny shapes, the same code path

Per model: one folder written by mambakit's `save_pretrained(format="hf")` (random weights, the vocabulary 32000),
then each implementation loaded from it in --dtype and measured alone on the device (the other one freed), so
that each peak memory holds only its own weights:
- prefill: one forward of (batch, --seqlen) tokens filling a cache, the logits of the last token only
  (mambakit: `num_last_tokens=1` into `allocate_cache`; transformers: `use_cache=True, logits_to_keep=1`);
- decode: greedy ms per token, (time of generating 1 + --new-tokens tokens - time of generating 1) / --new-tokens,
  after a --seqlen prompt (mambakit: `generate(temperature=0)`, through a CUDA graph where the model allows one,
  eagerly otherwise, the reason in the row; transformers: `generate(do_sample=False)` with its own cache);
- train: forward + backward of the next-token cross-entropy over (--train-batch, --seqlen) tokens, the same loss
  formula on both sides, the parameters in --dtype (no optimizer step).
Each row has both sides' ms and peak GiB (CUDA's max_memory_allocated), the speedup (transformers ms / mambakit
ms), which Mamba-2 kernels transformers used (mamba_ssm / causal_conv1d when importable, else its PyTorch fallback)
and, for decode, how many of the first 8 greedy tokens agree (greedy_agree, the leading ones equal) and
greedy_gap: the most transformers' own logits, teacher-forced on mambakit's tokens, prefer another token over
mambakit's in those 8 steps (0: each of mambakit's tokens is transformers' greedy choice too; of the size of a
bfloat16 rounding of the logits: the two differ at a tie, which random weights make likely). Without transformers
it times mambakit alone and
says so. JSON rows go to $OUT/hybrid_gpu.jsonl (or --out); a markdown table is printed at the end.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from _common import Rows, device_line, first_call_s, sync, table, time_ms
from mambakit.errors import MambaKitError
from mambakit.models.cuda_graph import check_graphable
from mambakit.models.hybrid import HybridLM
from mambakit.models.io import from_pretrained, save_pretrained
from mambakit.models.io.hybrid import config_from_hybrid_hf

VOCAB = 32000
AGREE = 8  # greedy tokens compared
MODELS = ("bamba", "nemotron_h")
COLUMNS = ["model", "measure", "batch", "tokens", "mambakit_ms", "transformers_ms", "speedup", "mambakit_gib",
           "transformers_gib", "mambakit_path", "transformers_path", "greedy_agree", "greedy_gap"]


def raw_config(model_type: str, d_model: int, n_layer: int, vocab: int, tiny: bool) -> dict[str, Any]:
    """A transformers config.json of `model_type` at realistic proportions (heads of 128, Mamba heads of 64, d_state
    128; tiny: 16, 16, 16)."""
    head, m_head, d_state = (16, 16, 16) if tiny else (128, 64, 128)
    heads = d_model // head
    common = dict(model_type=model_type, vocab_size=vocab, hidden_size=d_model, num_attention_heads=heads,
                  num_key_value_heads=max(1, heads // 4), tie_word_embeddings=False, pad_token_id=0)
    if model_type == "bamba":  # Bamba-9B: attention at a third and two thirds of the depth, SwiGLU 3.5 x d_model
        return dict(common, num_hidden_layers=n_layer, attn_layer_indices=sorted({n_layer // 3, 2 * n_layer // 3}),
                    intermediate_size=7 * d_model // 2, mamba_n_heads=2 * d_model // m_head, mamba_d_head=m_head,
                    mamba_n_groups=1, mamba_d_state=d_state, mamba_chunk_size=16 if tiny else 256)
    if model_type == "nemotron_h":  # Nemotron-H-8B's pattern: Mamba-2 and MLP layers alternating, every 4th mixer
        types = ["mlp" if i % 2 else ("full_attention" if i % 8 == 6 else "linear_attention") for i in range(n_layer)]
        if "full_attention" not in types and n_layer > 2:  # a short stack still gets its attention layer
            types[(n_layer - 2) // 2 * 2] = "full_attention"
        return dict(common, layers_block_type=types, head_dim=head, intermediate_size=4 * d_model,
                    mamba_num_heads=2 * d_model // m_head, mamba_head_dim=m_head, n_groups=2 if tiny else 8,
                    ssm_state_size=d_state, chunk_size=16 if tiny else 128)
    raise SystemExit(f"error: unknown model {model_type!r}; known: {list(MODELS)}")


def write_folder(raw: dict[str, Any], folder: Path, device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = HybridLM(config_from_hybrid_hf(raw), device=device, dtype=dtype)
    model.pretrained_source = {"format": "hf", "path": None, "config": raw}
    save_pretrained(model, folder, format="hf")


def import_transformers() -> Optional[Any]:
    try:
        import transformers
    except Exception as exc:  # any failure means "mambakit only"
        print(f"# transformers not importable ({type(exc).__name__}: {exc}); mambakit only")
        return None
    transformers.logging.set_verbosity_error()
    print(f"# transformers {transformers.__version__} imported")
    return transformers


def hf_kernel_path(model: torch.nn.Module) -> str:
    """Which implementation transformers' Mamba-2 functions of this model resolved to: its kernel-or-fallback
    wrappers each hold the implementation they picked at import."""
    module = sys.modules.get(type(model).__module__)
    picked = set()
    for fn in vars(module).values() if module else ():
        code = getattr(fn, "__code__", None)
        if code is not None and "is_new_implementation" in code.co_freevars and fn.__closure__:
            cells = dict(zip(code.co_freevars, fn.__closure__))
            impl = cells["implementation"].cell_contents
            picked.add(impl.__module__.split(".")[0] if cells["is_new_implementation"].cell_contents else "torch")
    if not picked:
        found = [name for name in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(name) is not None]
        kernels = f"unknown ({'+'.join(found) or 'neither mamba_ssm nor causal_conv1d'} importable)"
    else:
        kernels = "torch fallback" if picked == {"torch"} else "+".join(sorted(picked))
    return f"{kernels}, attention {getattr(model.config, '_attn_implementation', None) or 'default'}"


def peak_gib(device: str) -> Optional[float]:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def failure(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"


def measured(fn: Callable[[], Any], device: str, repeats: int, warmup: int, first: bool = False) -> dict[str, Any]:
    """{"ms", "gib"} of fn (and "first_s", the first call's seconds, with first), or {"error"} (an out-of-memory or
    any failure: reported, the run goes on)."""
    row: dict[str, Any] = {}
    try:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        if first:
            row["first_s"] = first_call_s(fn)
        row["ms"] = time_ms(fn, repeats=repeats, warmup=warmup)
        return dict(row, gib=peak_gib(device))
    except Exception as exc:  # one failure must not hide the other numbers
        return dict(row, error=failure(exc))
    finally:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


class Side:
    """One implementation's forward, generate and path description (mambakit's or transformers')."""

    def __init__(self, name: str, model: torch.nn.Module, device: str):
        self.name, self.model, self.device = name, model, device
        self.hf = name == "transformers"
        self.decode_path = "eager"
        if self.hf:
            self.path = hf_kernel_path(model)
        else:
            self.path = "triton" if device.startswith("cuda") else "torch"

    def logits(self, ids: torch.Tensor, last: bool) -> torch.Tensor:
        if self.hf:
            return self.model(input_ids=ids, use_cache=last, logits_to_keep=1 if last else 0).logits
        if last:
            cache = self.model.allocate_cache(ids.shape[0], device=ids.device)
            return self.model(ids, cache=cache, num_last_tokens=1).logits
        return self.model(ids).logits

    def generate(self, prompt: torch.Tensor, new: int) -> torch.Tensor:
        if self.hf:
            return self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)
        graph = self.decode_path == "cuda graph"
        return self.model.generate(prompt, new, temperature=0, cuda_graph=graph)

    def pick_decode_path(self, batch: int) -> None:
        if self.hf:
            return
        try:
            check_graphable(self.model, batch)
            self.decode_path = "cuda graph"
        except MambaKitError as exc:
            self.decode_path = "eager: " + str(exc).split(";")[0].split(":")[0][:60]


def greedy_gap(side: Side, seq: torch.Tensor, n_prompt: int) -> float:
    """max over the rows and the AGREE greedy steps of seq (prompt + mambakit's tokens) of how much `side`'s own
    logits, teacher-forced on seq, prefer their best token over mambakit's: 0 when each of mambakit's tokens is
    side's greedy choice too; a bfloat16 rounding of the logits' size when a step differs at a tie."""
    logits = side.logits(seq, last=False)[:, n_prompt - 1:-1].float()
    chosen = logits.gather(-1, seq[:, n_prompt:, None])
    return float((logits.max(-1, keepdim=True).values - chosen).max())


def run_side(side: Side, args, results: dict, tokens: dict) -> None:
    """Every measurement of one side into results[(measure, batch)][side.name]; its greedy tokens into tokens."""
    gen = torch.Generator().manual_seed(1)
    ids_of = lambda b: torch.randint(1, args.vocab, (b, args.seqlen), generator=gen).to(args.device)  # noqa: E731
    model = side.model
    model.eval()
    with torch.inference_mode():
        for b in args.prefill_batches:
            ids = ids_of(b)
            results.setdefault(("prefill", b), {})[side.name] = measured(
                lambda: side.logits(ids, last=True), args.device, args.repeats, args.warmup, first=True)
        if not args.skip_decode:
            for b in args.decode_batches:
                prompt = ids_of(b)
                side.pick_decode_path(b)
                out = {}
                one = measured(lambda: side.generate(prompt, 1), args.device, args.decode_repeats, 1)
                full = measured(lambda: out.setdefault("t", side.generate(prompt, 1 + args.new_tokens)),
                                args.device, args.decode_repeats, 1)
                if "ms" in one and "ms" in full:
                    full["ms"] = (full["ms"] - one["ms"]) / args.new_tokens
                    tokens[(b, side.name)] = out["t"][:, :args.seqlen + AGREE].cpu()
                ours = tokens.get((b, "mambakit"))
                if side.hf and ours is not None:
                    try:
                        full["gap"] = greedy_gap(side, ours.to(args.device), args.seqlen)
                    except Exception as exc:  # reported in the row, the run goes on
                        full["gap"] = failure(exc)
                results.setdefault(("decode", b), {})[side.name] = dict(full, path=side.decode_path)
    if args.skip_train:
        return
    ids = ids_of(args.train_batch)
    model.train()

    def train_step() -> None:
        logits = side.logits(ids, last=False)[:, :-1, :args.vocab]
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)

    results.setdefault(("train", args.train_batch), {})[side.name] = measured(train_step, args.device, args.repeats,
                                                                              args.warmup)
    model.eval()


def load_side(name: str, folder: Path, args, transformers) -> Side:
    if name == "mambakit":
        return Side(name, from_pretrained(folder, device=args.device, dtype=args.dtype), args.device)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=args.dtype).to(args.device)
    return Side(name, model, args.device)


def rows_of(model_type: str, args, results: dict, tokens: dict, paths: dict) -> list[dict[str, Any]]:
    rows = []
    for (measure, batch), sides in results.items():
        ours, theirs = sides.get("mambakit", {}), sides.get("transformers", {})
        row = dict(model=model_type, measure=measure, batch=batch,
                   tokens=f"{batch} x {args.seqlen}" + (f" + {args.new_tokens}" if measure == "decode" else ""),
                   mambakit_ms=ours.get("ms", ours.get("error")), transformers_ms=theirs.get("ms", theirs.get("error")),
                   mambakit_gib=ours.get("gib"), transformers_gib=theirs.get("gib"),
                   mambakit_path=ours.get("path", paths.get("mambakit")),
                   transformers_path=paths.get("transformers", "not run"))
        if isinstance(row["mambakit_ms"], float) and isinstance(row["transformers_ms"], float):
            row["speedup"] = row["transformers_ms"] / row["mambakit_ms"]
        if measure == "prefill":
            row.update(mambakit_first_s=ours.get("first_s"), transformers_first_s=theirs.get("first_s"))
        if measure == "decode" and (batch, "mambakit") in tokens and (batch, "transformers") in tokens:
            new = slice(args.seqlen, args.seqlen + AGREE)
            same = (tokens[(batch, "mambakit")][:, new] == tokens[(batch, "transformers")][:, new]).cumprod(-1)
            row["greedy_agree"] = f"{int(same.sum(-1).min())}/{AGREE}"  # the leading tokens equal, worst row
            row["greedy_gap"] = theirs.get("gap")
        rows.append(row)
    return rows


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available; cpu with --tiny)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="the models' dtype (default: bfloat16; float32 with --tiny: "
                         "16-bit products are slow on a CPU)")
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--n-layer", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048, help="prefill, prompt and training length")
    ap.add_argument("--prefill-batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--decode-repeats", type=int, default=2)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--no-transformers", action="store_true", help="time mambakit alone")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shapes, one repeat")
    ap.add_argument("--out", default=None, help="JSON lines file (default: $OUT/hybrid_gpu.jsonl)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.d_model, args.n_layer, args.seqlen, args.new_tokens = 32, 4, 16, AGREE + 1
        args.prefill_batches, args.decode_batches, args.train_batch = [1, 2], [1], 2
        args.repeats, args.warmup, args.decode_repeats = 1, 0, 1
        args.device = args.device or "cpu"
    args.vocab = 256 if args.tiny else VOCAB
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = getattr(torch, args.dtype or ("float32" if args.tiny else "bfloat16"))
    if args.new_tokens < AGREE:
        ap.error(f"--new-tokens must be >= {AGREE} (the greedy tokens compared)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    transformers = None if args.no_transformers else import_transformers()
    print(f"# {device_line()}; {args.dtype}, d_model {args.d_model}, {args.n_layer} layers")
    rows = Rows("hybrid_gpu", args.out)
    for model_type in args.models:
        raw = raw_config(model_type, args.d_model, args.n_layer, args.vocab, args.tiny)
        results: dict = {}
        tokens: dict = {}
        paths: dict = {}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / model_type
            write_folder(raw, folder, args.device, args.dtype)
            for name in ("mambakit", "transformers") if transformers is not None else ("mambakit",):
                try:
                    side = load_side(name, folder, args, transformers)
                except Exception as exc:  # the other side still runs
                    print(f"# {model_type} {name}: loading failed: {failure(exc)}", flush=True)
                    paths[name] = f"loading failed: {failure(exc)}"
                    continue
                paths[name] = side.path
                n_params = sum(p.numel() for p in side.model.parameters())
                print(f"# {model_type} {name}: {n_params / 1e6:.1f}M parameters, path {side.path}", flush=True)
                run_side(side, args, results, tokens)
                del side
                gc.collect()
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                sync()
        for row in rows_of(model_type, args, results, tokens, paths):
            rows.add(**row)
        rows.save()  # after each model: a run cut short keeps what it measured
    print()
    print(table(rows.rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
