"""ReMamba on CPU: key-value retrieval with the needles far from the question (issue 10).

Task `recall` (default): `mambakit.remamba.data.recall_training_batch` / `recall_prompt`, the MQAR layout of
`mambakit tasks mqar` (pairs ``k v`` first, keys asked later) with random noise tokens instead of a filler; at
evaluation the pairs open the prompt and the question is its last token (`--n-pairs 1`: passkey retrieval).
Task `kv` (the first attempt): `kv_retrieval` / `kv_training_batch`, one ``SEP key value`` needle in the first
`--zone` of the prompt.

1. Train a small Mamba LM from scratch at a short length (`--base-len`).
2. Evaluate it at longer lengths with the needles far from the question.
3. Train ReMamba's added parameters (Q, K, V, b; optionally LoRA / dt) on the frozen base at `--adapt-lens`.
4. Train plain fine-tuning (LoRA on in_proj/out_proj, rank chosen for the same parameter count, + dt if ReMamba
   trains dt) on the same data for the same steps.
5. Print accuracy vs context length for base, base + ReMamba and base + plain fine-tuning; write JSON to --out.

Example: OMP_NUM_THREADS=1 python benchmarks/remamba_kv.py --out /tmp/remamba2
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel
from mambakit.remamba import ReMambaConfig, ReMambaLM
from mambakit.remamba.data import kv_retrieval, kv_training_batch, kv_vocab, recall_prompt, recall_training_batch
from mambakit.remamba.lora import dt_parameters, rank_for_budget
from mambakit.remamba.train import ReMambaTrainConfig, answer_loss_plain, train_added


def log(msg: str) -> None:
    print(msg, flush=True)


def train_base(args, vocab: int) -> MambaLMHeadModel:
    torch.manual_seed(args.seed)
    cfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=vocab,
                      ssm_cfg={"layer": "Mamba2" if args.arch == "mamba2" else "Mamba1", "d_state": args.d_state})
    base = MambaLMHeadModel(cfg)
    opt = torch.optim.AdamW(base.parameters(), lr=args.base_lr, weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    warm = args.base_warmup
    for step in range(args.base_steps):
        if step < warm:
            lr = args.base_lr * (step + 1) / warm
        else:
            lr = args.base_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, args.base_steps - warm))))
        for group in opt.param_groups:
            group["lr"] = lr
        if args.task == "recall":
            ids, targets = recall_training_batch(args.batch, args.base_len, args.base_pairs, args.n_keys, g)
        else:
            ids, targets = kv_training_batch(args.batch, args.base_len, args.base_pairs, args.n_keys, g)
        loss = base(ids, labels=targets).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"[base] step {step + 1}/{args.base_steps} loss {float(loss.detach()):.4f} ({time.time() - t0:.0f} s)")
    return base


def eval_prompts(n: int, length: int, args, g: torch.Generator):
    """(prompts (n, length), answers (n, 1)) of the evaluation / adaptation task."""
    if args.task == "recall":
        return recall_prompt(n, length, args.n_pairs, args.n_keys, g)
    return kv_retrieval(n, length, args.n_pairs, args.zone, args.n_keys, g)


@torch.no_grad()
def accuracy(lm: ReMambaLM, length: int, args, remamba: ReMambaConfig | None) -> float:
    g = torch.Generator().manual_seed(10_007 + length)
    correct = 0
    for start in range(0, args.eval_samples, args.eval_batch):
        n = min(args.eval_batch, args.eval_samples - start)
        prompts, answers = eval_prompts(n, length, args, g)
        if remamba is None:
            logits = lm.base(prompts, num_last_tokens=1).logits[:, -1]
        else:
            logits = lm(prompts, remamba, num_last_tokens=1).logits[:, -1]
        correct += int((logits[:, :lm.config.vocab_size].argmax(-1) == answers[:, 0]).sum())
    return correct / args.eval_samples


def adapt_batches(args):
    lens = args.adapt_lens

    def draw(g: torch.Generator):
        length = lens[int(torch.randint(0, len(lens), (1,), generator=g))]
        return eval_prompts(args.adapt_batch, length, args, g)

    return draw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/remamba")
    p.add_argument("--arch", choices=("mamba1", "mamba2"), default="mamba1")
    p.add_argument("--task", choices=("recall", "kv"), default="recall")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--n-keys", type=int, default=16)
    p.add_argument("--n-pairs", type=int, default=2)
    p.add_argument("--zone", type=float, default=0.1, help="needles in the first ZONE of the prompt at evaluation")
    p.add_argument("--base-len", type=int, default=64)
    p.add_argument("--base-pairs", type=int, default=4, help="needles per training context of the base (each asked)")
    p.add_argument("--base-steps", type=int, default=1000)
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--base-warmup", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--adapt-lens", type=int, nargs="+", default=[256, 512])
    p.add_argument("--adapt-steps", type=int, default=200)
    p.add_argument("--adapt-batch", type=int, default=16)
    p.add_argument("--adapt-lr", type=float, default=2e-3)
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank added to ReMamba's parameters (0: none)")
    p.add_argument("--train-dt", action="store_true", help="also train the dt projection (both variants)")
    p.add_argument("--p-range", type=float, nargs=2, default=[0.1, 0.3])
    p.add_argument("--rho-range", type=float, nargs=2, default=[0.05, 0.2])
    p.add_argument("--eval-p", type=float, default=0.2)
    p.add_argument("--eval-rho", type=float, default=0.1)
    p.add_argument("--eval-lens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = kv_vocab(args.n_keys)["vocab_size"]
    t_start = time.process_time()

    base_path = out / f"base_{args.task}_{args.base_pairs}_{args.n_keys}_{args.arch}_{args.d_model}_{args.n_layer}_" \
                      f"{args.d_state}_{args.base_len}_{args.base_steps}_{args.seed}.pt"
    if base_path.exists():
        base = torch.load(base_path, weights_only=False)
        log(f"base model from {base_path}")
    else:
        base = train_base(args, vocab)
        torch.save(base, base_path)
    base.eval()
    for prm in base.parameters():
        prm.requires_grad_(False)
    eval_cfg = ReMambaConfig(p=args.eval_p, rho=args.eval_rho, s=0.0)
    rows: dict[str, dict[int, float]] = {}
    rows["base"] = {L: accuracy(ReMambaLM(base), L, args, None) for L in args.eval_lens}
    log(f"base: {rows['base']}")

    common = dict(steps=args.adapt_steps, batch=args.adapt_batch, lr=args.adapt_lr, train_dt=args.train_dt,
                  seed=args.seed)
    rem = ReMambaLM(copy.deepcopy(base))
    rcfg = ReMambaTrainConfig(mode="remamba", lora_rank=args.lora_rank, p_range=tuple(args.p_range),
                              rho_range=tuple(args.rho_range), **common)
    info_r = train_added(rem, adapt_batches(args), rcfg, log=log)
    rows["base + ReMamba"] = {L: accuracy(rem, L, args, eval_cfg) for L in args.eval_lens}
    log(f"remamba ({info_r['n_trainable']} params, {info_r['seconds']:.0f} s): {rows['base + ReMamba']}")

    plain = ReMambaLM(copy.deepcopy(base))
    n_dt = sum(x.numel() for x in dt_parameters(plain.base)) if args.train_dt else 0
    rank = rank_for_budget(plain.base, info_r["n_trainable"] - n_dt)
    info_p = train_added(plain, adapt_batches(args), ReMambaTrainConfig(mode="plain", lora_rank=rank, **common),
                         log=log)
    rows["base + plain fine-tuning"] = {L: accuracy(plain, L, args, None) for L in args.eval_lens}
    log(f"plain (LoRA rank {rank}, {info_p['n_trainable']} params, {info_p['seconds']:.0f} s): "
        f"{rows['base + plain fine-tuning']}")

    header = "| model | trained params | " + " | ".join(f"L={L}" for L in args.eval_lens) + " |"
    print(header)
    print("|---" * (len(args.eval_lens) + 2) + "|")
    counts = {"base": sum(x.numel() for x in base.parameters()), "base + ReMamba": info_r["n_trainable"],
              "base + plain fine-tuning": info_p["n_trainable"]}
    for name, accs in rows.items():
        print(f"| {name} | {counts[name]} | " + " | ".join(f"{100 * accs[L]:.1f}%" for L in args.eval_lens) + " |")
    print(f"process CPU time {time.process_time() - t_start:.0f} s")
    result = {"cpu_seconds": time.process_time() - t_start, "args": vars(args), "rows": rows, "counts": counts,
              "lora_rank_plain": rank, "losses": {"remamba": info_r["losses"], "plain": info_p["losses"]}}
    (out / f"result_{args.arch}_seed{args.seed}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
