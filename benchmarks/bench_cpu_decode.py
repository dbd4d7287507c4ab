"""CPU decode at batch 1, float32 and bfloat16, today's step against an earlier one, interleaved in one process.

    python benchmarks/bench_cpu_decode.py                                  # 130M shape, both archs, 1 thread
    git -C . show BASE:mambakit/ops/mixer_step.py > /tmp/base_mixer_step.py
    python benchmarks/bench_cpu_decode.py --baseline-mixer-step /tmp/base_mixer_step.py --threads 1 2
    mkdir /tmp/base_tree && git archive BASE mambakit | tar -x -C /tmp/base_tree
    python benchmarks/bench_cpu_decode.py --baseline-tree /tmp/base_tree --threads 1 2     # the whole decode

Variants, each a model of the 130M shape (random weights, official initialisation, seed 0):
  fp32            float32 weights, today's lean step
  fp32 base       the same model stepped by the mixer steps of --baseline-mixer-step (a mixer_step.py file)
  bf16            a bfloat16 copy, today's step (float32 accumulation: `mambakit.ops.cpu_linear`)
  bf16 products   the bfloat16 copy with torch's bfloat16 products (cpu_linear.ENABLED off; with a baseline file,
                  its mixer steps too: the previous bfloat16 decode path)
  bf16 weights    float32 arithmetic on the bfloat16-rounded weights: the distance that bfloat16 weights cost at
                  any arithmetic precision (timed as float32)
  fp32 tree, bf16 tree   with --baseline-tree DIR: the same weights in the models of the mambakit package in DIR (an
                  older checkout, imported under another name), stepped by its code: the whole decode before and after
Every round prefills a --prompt-token random prompt and runs --new-tokens one-token steps fed the tokens float32
picks greedily, variant after variant; decode tok/s is the median over --rounds (wall clock; "cpu" the thread CPU
time per token, which other processes on the machine disturb less). Logits at the decoded positions are compared
with float32's: median and max |difference|, argmax agreement.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import inspect
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from _common import Rows, table
from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.layers import mamba as mamba1_layer, mamba2 as mamba2_layer
from mambakit.ops import cpu_linear
from mambakit.ops.derived import negative_exp

SHAPES = {"130m": (768, 24, 50277), "tiny": (64, 2, 256)}
COLUMNS = ["arch", "variant", "threads", "decode_tok_s", "cpu_ms_token", "median_abs_diff", "max_abs_diff",
           "argmax_agree", "load_1min"]


def load_baseline_tree(path: Optional[str]) -> Optional[Any]:
    """The mambakit package in path (path/mambakit), copied to a temporary folder as `mambakit_baseline` with its own
    imports renamed, and imported beside today's."""
    if path is None:
        return None
    target = Path(tempfile.mkdtemp(prefix="mambakit_baseline_"))
    shutil.copytree(Path(path) / "mambakit", target / "mambakit_baseline")
    pattern = re.compile(r"\bmambakit(?=[.\s])")
    for file in (target / "mambakit_baseline").rglob("*.py"):
        file.write_text(pattern.sub("mambakit_baseline", file.read_text()))
    sys.path.insert(0, str(target))
    return importlib.import_module("mambakit_baseline")


def load_baseline(path: Optional[str]) -> Optional[Any]:
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("baseline_mixer_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kept_A(step: Callable[..., Any], a_log_index: int) -> Callable[..., Any]:
    """A baseline mixer step as its layers called it: with A = -exp(A_log) kept per weight version (as the layers
    did before the steps kept it themselves) where it takes A, else without."""
    if "A" not in inspect.signature(step).parameters:
        return lambda *a, A=None, **k: step(*a, **k)
    return lambda *a, A=None, **k: step(*a, A=negative_exp(a[a_log_index], a[2].dtype), **k)


@contextlib.contextmanager
def stepping(baseline: Optional[Any], fp32_accumulation: bool) -> Iterator[None]:
    """Inside: the layers call the baseline module's mixer steps (when given); cpu_linear on or off."""
    saved = (mamba1_layer.mamba1_step, mamba2_layer.mamba2_step, cpu_linear.ENABLED)
    if baseline is not None:
        mamba1_layer.mamba1_step = _kept_A(baseline.mamba1_step, 8)
        mamba2_layer.mamba2_step = _kept_A(baseline.mamba2_step, 6)
    cpu_linear.ENABLED = fp32_accumulation
    try:
        yield
    finally:
        mamba1_layer.mamba1_step, mamba2_layer.mamba2_step, cpu_linear.ENABLED = saved


@torch.inference_mode()
def decode(model: MambaLMHeadModel, prompt: torch.Tensor, tokens: Optional[list[int]],
           new_tokens: int) -> tuple[list[int], torch.Tensor, float, float]:
    """(tokens fed, logits before each (new_tokens, vocab) float32, decode wall s, decode thread CPU s)."""
    cache = model.allocate_cache(batch_size=1)
    logits = model(prompt, cache=cache).logits[0, -1]
    fed, rows, wall, cpu = [], [], 0.0, 0.0
    for i in range(new_tokens):
        rows.append(logits.float())
        token = int(logits.argmax()) if tokens is None else tokens[i]
        fed.append(token)
        if i + 1 < new_tokens:
            w0, c0 = time.perf_counter(), time.thread_time()
            logits = model.step(torch.tensor([token]), cache)[0]
            wall, cpu = wall + time.perf_counter() - w0, cpu + time.thread_time() - c0
    return fed, torch.stack(rows), wall, cpu


def measure(arch: str, shape: str, prompt_len: int, new_tokens: int, rounds: int, baseline: Optional[Any],
            rows: Rows, tree: Optional[Any] = None) -> None:
    d_model, n_layer, vocab = SHAPES[shape]
    torch.manual_seed(0)
    ssm = {"layer": "Mamba2", "d_state": 16 if shape == "tiny" else 128, "headdim": 16 if shape == "tiny" else 64} \
        if arch == "mamba2" else {"layer": "Mamba1"}
    fp32 = MambaLMHeadModel(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, ssm_cfg=ssm)).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    rounded = copy.deepcopy(bf16).float()
    variants: dict[str, tuple[MambaLMHeadModel, Callable[[], Any]]] = {
        "fp32": (fp32, lambda: stepping(None, True)),
        "bf16": (bf16, lambda: stepping(None, True)),
        "bf16 products": (bf16, lambda: stepping(baseline, False)),
        "bf16 weights": (rounded, lambda: stepping(None, True)),
    }
    if baseline is not None:
        variants["fp32 base"] = (fp32, lambda: stepping(baseline, True))
    if tree is not None:
        old = tree.MambaLMHeadModel(tree.MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab,
                                                     ssm_cfg=ssm)).eval()
        old.load_state_dict(fp32.state_dict())
        variants["fp32 tree"] = (old, contextlib.nullcontext)
        variants["bf16 tree"] = (copy.deepcopy(old).to(torch.bfloat16), contextlib.nullcontext)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    ref_tokens, ref, _, _ = decode(fp32, prompt, None, new_tokens)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    logits: dict[str, torch.Tensor] = {}
    for _ in range(rounds):
        for name, (model, ctx) in variants.items():
            with ctx():
                _, logits[name], wall, cpu = decode(model, prompt, ref_tokens, new_tokens)
            times[name].append((wall, cpu))
    for name in variants:
        d = (logits[name] - ref)[:, :vocab].abs()
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        rows.add(arch=arch, variant=name, threads=torch.get_num_threads(), prompt=prompt_len, new_tokens=new_tokens,
                 decode_tok_s=(new_tokens - 1) / wall, cpu_ms_token=1e3 * cpu / (new_tokens - 1),
                 median_abs_diff=float(d.median()), max_abs_diff=float(d.max()),
                 argmax_agree=int((logits[name][:, :vocab].argmax(-1) == torch.tensor(ref_tokens)).sum()),
                 load_1min=os.getloadavg()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["mamba1", "mamba2"], choices=["mamba1", "mamba2"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=33, help="decoded tokens (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-mixer-step", help="a mixer_step.py to compare the steps with (e.g. an older one)")
    parser.add_argument("--baseline-tree", help="a folder holding an older mambakit package (e.g. git archive BASE "
                        "mambakit | tar -x -C DIR): its whole decode beside today's")
    parser.add_argument("--tiny", action="store_true", help="d_model 64, 2 layers, vocab 256 (smoke test)")
    parser.add_argument("--json", help="rows as JSON lines (default: $OUT/cpu_decode.jsonl)")
    args = parser.parse_args()
    baseline = load_baseline(args.baseline_mixer_step)
    tree = load_baseline_tree(args.baseline_tree)
    rows = Rows("cpu_decode", args.json)
    print(f"# load average at start: {os.getloadavg()}", flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for arch in args.arch:
            measure(arch, "tiny" if args.tiny else "130m", 16 if args.tiny else args.prompt,
                    8 if args.tiny else args.new_tokens, args.rounds, baseline, rows, tree)
    rows.save()
    print(table([{k: f"{v:.2e}" if "diff" in k else v for k, v in r.items()} for r in rows.rows], COLUMNS))


if __name__ == "__main__":
    main()
