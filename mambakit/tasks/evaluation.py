"""Held-out evaluation of a task model: accuracy at the positions with a target, over a whole sequence or chunk by
chunk through the inference cache (constant memory for an SSM), at the training length and at other lengths."""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from mambakit.layers.registry import mixer_spec
from mambakit.models.config import MambaConfig
from mambakit.tasks.config import TaskConfig, task_kwargs
from mambakit.tasks.generators import IGNORE, make_batch

#: Sequences per evaluation batch at length L: at most max(1, EVAL_BATCH_TOKENS // L) (and the training batch).
EVAL_BATCH_TOKENS = 1 << 18


def eval_mode(mixer: str, length: int, chunk: int) -> str:
    """How a model is run at `length`: 'full' (one forward), 'recurrent' (SSM cache, chunk by chunk; constant
    memory) or 'kv' (attention KV cache, chunk by chunk)."""
    name = mixer_spec(mixer, arg="--mixer").name
    if length <= chunk or name == "S4":
        return "full"
    return "kv" if name == "MHA" else "recurrent"


@torch.no_grad()
def count_correct(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                  mode: str = "full", chunk: int = 4096) -> tuple[int, int]:
    """(correct, total) argmax predictions at the positions with a target. mode 'recurrent' / 'kv' feeds the
    sequence in chunks of `chunk` tokens through `model.allocate_cache` (for an SSM the state has a constant size)."""
    if mode == "full":
        pieces = [(0, ids.shape[1])]
        cache = None
    else:
        pieces = [(a, min(a + chunk, ids.shape[1])) for a in range(0, ids.shape[1], chunk)]
        cache = model.allocate_cache(ids.shape[0], device=ids.device)
    correct = total = 0
    for a, b in pieces:
        t = targets[:, a:b]
        has = t != IGNORE
        if not bool(has.any()):
            if cache is not None:  # advance the state; no logits needed
                model(ids[:, a:b], cache=cache, num_last_tokens=1)
            continue
        # only the logits from the first position with a target on are needed
        first = int(has.any(0).nonzero()[0])
        n_last = (b - a) - first
        logits = model(ids[:, a:b], cache=cache, num_last_tokens=n_last).logits[..., :vocab_size]
        t, has = t[:, first:], has[:, first:]
        correct += int(((logits.argmax(-1) == t) & has).sum())
        total += int(has.sum())
    return correct, total


def accuracy_on(model: torch.nn.Module, data: Sequence[tuple[torch.Tensor, torch.Tensor]], vocab_size: int,
                device: torch.device, mode: str = "full", chunk: int = 4096) -> float:
    """Accuracy over batches of (ids, targets), each (batch, seqlen), by `count_correct` (model put back in its
    previous train/eval mode)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for ids, targets in data:
            c, n = count_correct(model, ids.to(device), targets.to(device), vocab_size, mode, chunk)
            correct, total = correct + c, total + n
    finally:
        model.train(was_training)
    return correct / max(total, 1)


def eval_set(name: str, n: int, batch: int, seq_len: int, seed: int,
              **task_kw: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed held-out set of n sequences (its own generator, never the training one), in batches."""
    g = torch.Generator().manual_seed(10_000_019 + 7919 * seed + seq_len)
    out = []
    for start in range(0, n, batch):
        out.append(make_batch(name, min(batch, n - start), seq_len, g, **task_kw))
    return out


def evaluate_lengths(model: torch.nn.Module, cfg: TaskConfig, config: MambaConfig, vocab_size: int, acc: float,
                     device: torch.device, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Accuracy at each of `cfg.eval_lengths` ({str(length): {accuracy, samples, mode, seconds}}; accuracy None and
    a 'skipped' reason above max_attention_len / max_full_len). `acc` is the accuracy at the training length."""
    name = mixer_spec(cfg.mixer).name
    task_kw = task_kwargs(cfg, held_out=True)
    by_len: dict[str, dict[str, Any]] = {}
    for L in cfg.eval_lengths:
        t0 = time.perf_counter()
        mode = eval_mode(cfg.mixer, L, cfg.eval_chunk)
        limit_name = {"MHA": "max_attention_len", "S4": "max_full_len"}.get(name)
        limit = getattr(cfg, limit_name) if limit_name else None
        if limit is not None and L > limit:
            by_len[str(L)] = {"accuracy": None, "samples": 0, "mode": mode, "seconds": 0.0,
                              "skipped": f"length > {limit_name} = {limit}"}
            log(f"  length {L}: skipped ({by_len[str(L)]['skipped']})")
            continue
        if L == cfg.seq_len:
            n, acc_L = cfg.eval_samples, acc
        else:
            n = min(cfg.eval_samples, max(cfg.min_long_eval_samples, cfg.long_eval_tokens // L))
            eval_batch = max(1, min(cfg.batch, n, EVAL_BATCH_TOKENS // L))
            chunk = cfg.eval_chunk
            if mode == "kv":  # keep the (batch, heads, chunk, L) attention scores of one chunk near 2^26 numbers
                heads = config.attn_cfg.get("num_heads", 1)
                chunk = max(1, min(cfg.eval_chunk, (1 << 26) // (eval_batch * heads * L)))
            data = eval_set(cfg.name, n, eval_batch, L, cfg.seed, **task_kw)
            acc_L = accuracy_on(model, data, vocab_size, device, mode=mode, chunk=chunk)
        by_len[str(L)] = {"accuracy": acc_L, "samples": n, "mode": mode, "seconds": time.perf_counter() - t0}
        log(f"  length {L}: accuracy {acc_L:.4f} ({n} sequences, {mode} mode, {by_len[str(L)]['seconds']:.1f} s)")
    return by_len
