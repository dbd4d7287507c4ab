"""How far CPU bfloat16 decoding is from float32: logit distance and greedy agreement, with the decode time of each.

    python benchmarks/bench_cpu_accuracy.py                    # 130M shape, Mamba-1 and Mamba-2, prompt 256 + 64
    python benchmarks/bench_cpu_accuracy.py --arch mamba2 --threads 1
    python benchmarks/bench_cpu_accuracy.py --tiny             # tiny shapes (smoke test)

One float32 model with the official initialisation (seed 0) and a bfloat16 copy of the same weights. The float32
model prefills a random prompt and decodes `--new-tokens` greedy tokens; the bfloat16 copy is then fed the same
tokens (teacher forcing) and its logits at every decoded position are compared with float32's: median and maximum
|bf16 - fp32|, and how often their argmax agree. It also decodes greedily on its own: "greedy agree" counts the
positions where its tokens equal float32's (the sequences drift apart after a first disagreement, so "first
diff" gives where that happened). ms/token: median over the decode steps of `model.step`.
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch

from _common import Rows, table
from mambakit import MambaConfig, MambaLMHeadModel

SHAPES = {"130m": (768, 24, 50277), "tiny": (64, 2, 256)}


def ssm_cfg(arch: str, tiny: bool) -> dict[str, Any]:
    if arch == "mamba2":
        return {"layer": "Mamba2", "d_state": 16 if tiny else 128, "headdim": 16 if tiny else 64}
    return {"layer": "Mamba1", "d_state": 16}


@torch.inference_mode()
def decode(model: MambaLMHeadModel, prompt: torch.Tensor, new_tokens: int,
           forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Prefill `prompt` (1, L), then `new_tokens` one-token steps feeding the argmax (or `forced`, (new_tokens,)).
    Returns the tokens fed (new_tokens,), the float32 logits that chose them (new_tokens, vocab) and the step times
    in seconds."""
    cache = model.allocate_cache(batch_size=1)
    logits = model(prompt, cache=cache).logits[:, -1]  # (1, vocab)
    tokens, rows, times = [], [], []
    for i in range(new_tokens):
        rows.append(logits[0].float())
        token = logits.argmax(-1) if forced is None else forced[i:i + 1]
        tokens.append(int(token))
        if i + 1 < new_tokens:
            t0 = time.perf_counter()
            logits = model.step(token, cache)
            times.append(time.perf_counter() - t0)
    return torch.tensor(tokens), torch.stack(rows), times


def measure(arch: str, shape: str, prompt_len: int, new_tokens: int, rows: Rows) -> None:
    d_model, n_layer, vocab = SHAPES[shape]
    torch.manual_seed(0)
    config = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, ssm_cfg=ssm_cfg(arch, shape == "tiny"))
    fp32 = MambaLMHeadModel(config).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    ref_tokens, ref_logits, fp32_times = decode(fp32, prompt, new_tokens)
    _, forced_logits, _ = decode(bf16, prompt, new_tokens, forced=ref_tokens)
    own_tokens, _, bf16_times = decode(bf16, prompt, new_tokens)
    diff = (forced_logits - ref_logits)[:, :vocab].abs()  # (new_tokens, vocab)
    same = own_tokens == ref_tokens
    rows.add(arch=arch, shape=shape, prompt=prompt_len, new_tokens=new_tokens, threads=torch.get_num_threads(),
             median_abs_diff=float(diff.median()), max_abs_diff=float(diff.max()),
             fp32_logit_std=float(ref_logits[:, :vocab].std()),
             argmax_agree=int((forced_logits[:, :vocab].argmax(-1) == ref_tokens).sum()),
             greedy_agree=int(same.sum()), first_diff=int((~same).nonzero()[0]) if not bool(same.all()) else None,
             fp32_ms_token=1e3 * float(torch.tensor(fp32_times).median()) if fp32_times else None,
             bf16_ms_token=1e3 * float(torch.tensor(bf16_times).median()) if bf16_times else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["mamba1", "mamba2"], choices=["mamba1", "mamba2"])
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="d_model 64, 2 layers, vocab 256, prompt 16 + 8")
    parser.add_argument("--json", help="write the rows as JSON lines here (default: $OUT/cpu_accuracy.jsonl)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape, prompt_len, new_tokens = ("tiny", 16, 8) if args.tiny else ("130m", args.prompt, args.new_tokens)
    rows = Rows("cpu_accuracy", args.json)
    for arch in args.arch:
        measure(arch, shape, prompt_len, new_tokens, rows)
    rows.save()
    shown = [{k: f"{v:.2e}" if "diff" in k and isinstance(v, float) else v for k, v in r.items()} for r in rows.rows]
    print(table(shown, ["arch", "shape", "prompt", "new_tokens", "threads", "median_abs_diff", "max_abs_diff",
                            "fp32_logit_std", "argmax_agree", "greedy_agree", "first_diff", "fp32_ms_token",
                            "bf16_ms_token"]))


if __name__ == "__main__":
    main()
