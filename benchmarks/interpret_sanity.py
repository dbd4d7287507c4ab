"""Sanity experiment for mambakit.interpret: does the hidden attention of a trained model point at the token that
determines the answer?

Two synthetic tasks, each with one token that decides the answer to the last prediction:
  * copy:      random content tokens, a MARK token before one of them, QUERY last; the answer is the marked token.
  * induction: random tokens; the last token is a key that occurred once before; the answer is the token that
               followed that occurrence (the determining token).
A small Mamba LM is trained on each (loss on the last prediction only), then, on held-out sequences, each layer's
mean |hidden attention| row of the last position (the predicting token itself excluded) is compared with the
determining position: its share of the row's mass, and how often it is the row's maximum. The same for the
rollout, the gradient-weighted rollout, and for both matrix forms ("ssm": the scan's alpha; "block": conv, SiLU and
gates folded in). Every map is also scored against the token before the determining one (the marker, or the
induction key) and against the conv-shifted positions (determining + 1 .. + d_conv - 1).

Run (CPU, one thread; about 2-4 minutes for both tasks on an idle core, longer on a busy machine):
    python benchmarks/interpret_sanity.py
    python benchmarks/interpret_sanity.py --task copy --arch mamba2
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mambakit.interpret import explain
from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel

N_CONTENT = 16
MARK, QUERY = N_CONTENT, N_CONTENT + 1
VOCAB = N_CONTENT + 2


def copy_batch(gen: torch.Generator, n: int, seqlen: int):
    """(ids, determining position, answer)."""
    ids = torch.randint(0, N_CONTENT, (n, seqlen), generator=gen)
    marker = torch.randint(0, seqlen - 3, (n,), generator=gen)
    rows = torch.arange(n)
    ids[rows, marker] = MARK
    ids[:, -1] = QUERY
    return ids, marker + 1, ids[rows, marker + 1]


def induction_batch(gen: torch.Generator, n: int, seqlen: int):
    """The key (last token) occurs exactly once before, at p; the answer is ids[p + 1] (the determining token)."""
    key = torch.randint(0, N_CONTENT, (n,), generator=gen)
    # other tokens avoid the key: draw from N_CONTENT - 1 values and shift those >= key
    ids = torch.randint(0, N_CONTENT - 1, (n, seqlen), generator=gen)
    ids = ids + (ids >= key[:, None]).long()
    p = torch.randint(0, seqlen - 3, (n,), generator=gen)
    rows = torch.arange(n)
    ids[rows, p] = key
    ids[:, -1] = key
    return ids, p + 1, ids[rows, p + 1]


TASKS = {"copy": copy_batch, "induction": induction_batch}


def train(task: str, arch: str, steps: int, seqlen: int, seed: int, d_model: int, n_layer: int, lr: float,
          batch: int, log_every: int) -> MambaLMHeadModel:
    torch.manual_seed(seed)
    if arch == "mamba1":
        ssm = {"layer": "Mamba1", "d_state": 16}
    else:
        ssm = {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 32}
    model = MambaLMHeadModel(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg=ssm))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    make = TASKS[task]
    t0 = time.time()
    for step in range(1, steps + 1):
        ids, _, target = make(gen, batch, seqlen)
        loss = F.cross_entropy(model(ids).logits[:, -1, :VOCAB], target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"  [{task}/{arch}] step {step:5d}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)", flush=True)
    return model.eval()


def row_stats(rows: torch.Tensor, target: torch.Tensor, offsets=(0,)) -> tuple[float, float]:
    """rows: (n, L) non-negative with the self entry removed. Share of mass on target + offsets, top-1 hit rate."""
    rows = rows / rows.sum(-1, keepdim=True).clamp_min(1e-30)
    idx = torch.stack([(target + o).clamp(0, rows.shape[1] - 1) for o in offsets], -1)
    share = rows.gather(1, idx).sum(-1).mean().item()
    top = rows.argmax(-1)
    hit = sum((top == target + o) for o in offsets).bool().double().mean().item()
    return share, hit


def evaluate(model: MambaLMHeadModel, task: str, seqlen: int, n_eval: int, d_conv: int) -> None:
    ids, pos, answer = TASKS[task](torch.Generator().manual_seed(10_000), n_eval, seqlen)
    with torch.no_grad():
        acc = (model(ids).logits[:, -1, :VOCAB].argmax(-1) == answer).double().mean().item()
    print(f"  accuracy on {n_eval} held-out sequences: {acc:.3f};  uniform share of one token: "
          f"{1 / (seqlen - 1):.3f}")
    print(f"  {'form':5s} {'map':30s} {'share@tok':>9s} {'top1@tok':>9s} {'share@prev':>10s} {'top1@prev':>9s} "
          f"{'share@shift':>11s} {'top1@shift':>10s}")
    shifted = tuple(range(1, d_conv))
    for form in ("ssm", "block"):
        ex = explain(model, ids, target=answer, form=form)
        maps = {}
        for i, (a, g) in enumerate(zip(ex.attentions, ex.grad_attentions)):
            maps[f"layer {i} mean |attention|"] = a[:, -1]
            maps[f"layer {i} grad x attention"] = g[:, -1]
        maps["rollout (last row)"] = ex.rollout[:, -1]
        maps["grad-weighted rollout"] = ex.attribution[:, -1]
        for name, row in maps.items():
            row = row.clone()
            row[:, -1] = 0  # the predicting token itself
            share, hit = row_stats(row, pos)
            p_share, p_hit = row_stats(row, pos, (-1,))
            s_share, s_hit = row_stats(row, pos, shifted)
            print(f"  {form:5s} {name:30s} {share:9.3f} {hit:9.3f} {p_share:10.3f} {p_hit:9.3f} {s_share:11.3f} "
                  f"{s_hit:10.3f}")


# Per task: (arch, steps, seqlen, d_model, lr), each trained in about a minute on one CPU core.
PRESETS = {
    "copy": ("mamba1", 1000, 32, 32, 3e-3),
    "induction": ("mamba2", 2000, 16, 64, 3e-3),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("copy", "induction", "all"), default="all")
    p.add_argument("--arch", choices=("mamba1", "mamba2"), help="default: mamba1 for copy, mamba2 for induction")
    p.add_argument("--steps", type=int, help="default: 1000 for copy, 2000 for induction")
    p.add_argument("--seqlen", type=int, help="default: 32 for copy, 16 for induction")
    p.add_argument("--d-model", type=int, help="default: 32 for copy, 64 for induction")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--lr", type=float, help="default: 3e-3")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n-eval", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small shapes)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tasks = ("copy", "induction") if args.task == "all" else (args.task,)
    t0 = time.time()
    for task in tasks:
        arch, steps, seqlen, d_model, lr = PRESETS[task]
        arch = args.arch or arch
        steps = args.steps or steps
        seqlen = args.seqlen or seqlen
        d_model = args.d_model or d_model
        lr = args.lr or lr
        print(f"task {task}: {arch}, d_model {d_model}, {args.n_layer} layers, seqlen {seqlen}, {steps} steps of "
              f"{args.batch}, seed {args.seed}")
        model = train(task, arch, steps, seqlen, args.seed, d_model, args.n_layer, lr, args.batch,
                      max(1, steps // 5))
        evaluate(model, task, seqlen, args.n_eval, model.backbone.layers[0].mixer.d_conv)
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
