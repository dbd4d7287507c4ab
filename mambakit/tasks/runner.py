"""Train a small model from scratch on one synthetic task and measure its accuracy (``mambakit tasks``).

`run_task` builds a `MambaLMHeadModel` whose mixers are S4 (LTI), Mamba-1, Mamba-2 or attention, trains it with AdamW
(linear warmup, cosine decay, gradient clipping) on freshly generated batches, evaluates the accuracy on a fixed
held-out set every `eval_interval` steps, and for induction heads also at other lengths (`eval_lengths`). SSM models are
evaluated at long lengths in their constant-memory recurrent mode: the sequence is fed chunk by chunk through an
inference cache (exact for SSM mixers), so memory does not grow with the length. Attention evaluates through its
KV cache (memory and time grow with the length: lengths above `max_attention_len` are skipped) and S4 over the whole
sequence at once (its cached path is a per-token loop: lengths above `max_full_len` are skipped).

The model families are compared like for like: same d_model and n_layer; SSM blocks are the Mamba block with only the
SSM changed (S4 / S6 / SSD); the attention model is a Transformer (attention + gated MLP of width 2·d_model, rounded
up to 128 by the model), which gives it somewhat *more* parameters than the SSM models at the default sizes.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from mambakit.errors import MambaKitError
from mambakit.tasks.generators import IGNORE, TASKS, make_batch, task_vocab_size

MIXERS = ("s4", "mamba", "mamba2", "attention")
#: Sequences per evaluation batch at length L: at most max(1, EVAL_BATCH_TOKENS // L) (and the training batch).
EVAL_BATCH_TOKENS = 1 << 18
#: State size per mixer when d_state is not given (attention has none): S4's usual 64, Mamba-1's 16, Mamba-2's 64.
DEFAULT_D_STATE = {"s4": 64, "mamba": 16, "mamba2": 64, "attention": None}

#: Per-task defaults of `run_task`, sized so that one default run of each mixer the task compares takes ten minutes or
#: less of CPU time on one thread (measured times: benchmarks/RESULTS.md, "Synthetic tasks"). They are smaller than the
#: papers' settings (selective copying: 16 tokens in 4096, here 4 tokens in 256; MQAR: here 32 pairs in 128 with 256
#: token ids, d_model 32); pass seq_len, n_tokens, ... to change them. The same values serve every mixer of a task.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "selective-copying": {"steps": 2000, "batch": 16, "lr": 4e-3, "d_model": 64, "n_layer": 2, "seq_len": 256,
                          "vocab": 16, "n_tokens": 4, "weight_decay": 0.1, "eval_lengths": ()},
    "copying": {"steps": 1500, "batch": 32, "lr": 2e-3, "d_model": 64, "n_layer": 2, "seq_len": 128,
                "vocab": 16, "n_tokens": 16, "weight_decay": 0.1, "eval_lengths": ()},
    "induction-heads": {"steps": 2000, "batch": 16, "lr": 2e-3, "d_model": 64, "n_layer": 2, "seq_len": 256,
                        "vocab": 16, "weight_decay": 0.0, "eval_lengths": (256, 1024, 4096, 16384, 65536)},
    "mqar": {"steps": 5000, "batch": 32, "lr": 3e-3, "d_model": 32, "n_layer": 2, "seq_len": 128, "vocab": 256,
             "n_pairs": 32, "weight_decay": 0.1, "eval_lengths": ()},
}


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        flag = "--" + name.replace("_", "-")
        raise MambaKitError(f"{flag} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, positive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        flag = "--" + name.replace("_", "-")
        raise MambaKitError(f"{flag} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")


def mamba2_headdim(d_model: int, expand: int = 2) -> int:
    """Head size used for Mamba-2 when not given: the first of 64, 32, 16, 8 dividing d_inner (as ``mambakit train``;
    on CPU the SSD's chunk-local work grows with the number of heads, so fewer, larger heads are faster)."""
    d_inner = expand * d_model
    return next((h for h in (64, 32, 16, 8) if d_inner % h == 0), math.gcd(d_inner, 64))


def build_model_config(mixer: str, vocab_size: int, d_model: int, n_layer: int, d_state: Optional[int] = None,
                       headdim: Optional[int] = None, num_heads: Optional[int] = None,
                       attn_mlp: bool = True) -> "MambaConfig":  # noqa: F821
    """The `MambaConfig` of a task model with mixer s4 | mamba | mamba2 | attention."""
    from mambakit.models.config import MambaConfig

    if mixer not in MIXERS:
        raise MambaKitError(f"--mixer must be one of {list(MIXERS)}, got {mixer!r}")
    if mixer == "attention":
        heads = num_heads or max(1, d_model // 16)
        if d_model % heads:
            raise MambaKitError(f"--d-model {d_model} must be divisible by the number of heads {heads}")
        return MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size,
                           attn_layer_idx=list(range(n_layer)), attn_cfg={"num_heads": heads},
                           d_intermediate=2 * d_model if attn_mlp else 0)
    d_state = d_state or DEFAULT_D_STATE[mixer]
    if mixer == "s4":
        ssm_cfg: dict[str, Any] = {"layer": "S4", "d_state": d_state}
    elif mixer == "mamba":
        ssm_cfg = {"layer": "Mamba1", "d_state": d_state}
    else:
        hd = headdim or mamba2_headdim(d_model)
        if (2 * d_model) % hd:
            raise MambaKitError(f"Mamba-2 head size {hd} must divide d_inner = 2 * d_model = {2 * d_model}")
        ssm_cfg = {"layer": "Mamba2", "d_state": d_state, "headdim": hd}
    return MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size, ssm_cfg=ssm_cfg)


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to lr·min_ratio at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------
def eval_mode(mixer: str, length: int, chunk: int) -> str:
    """How a model is run at `length`: 'full' (one forward), 'recurrent' (SSM cache, chunk by chunk; constant
    memory) or 'kv' (attention KV cache, chunk by chunk)."""
    if length <= chunk or mixer == "s4":
        return "full"
    return "kv" if mixer == "attention" else "recurrent"


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


def _eval_set(name: str, n: int, batch: int, seq_len: int, seed: int,
              **task_kw: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed held-out set of n sequences (its own generator, never the training one), in batches."""
    g = torch.Generator().manual_seed(10_000_019 + 7919 * seed + seq_len)
    out = []
    for start in range(0, n, batch):
        out.append(make_batch(name, min(batch, n - start), seq_len, g, **task_kw))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------------
def plot_results(results: dict[str, Any], path: Path) -> bool:
    """Accuracy vs training step (and, for length evaluations, accuracy vs eval length) as a PNG; False when
    matplotlib is missing."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by_len = {int(k): v for k, v in results.get("eval_lengths", {}).items()}
    ncols = 2 if by_len else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), squeeze=False)
    ax = axes[0][0]
    hist = results["history"]
    ax.plot(hist["eval_step"], hist["eval_acc"], "o-", color="tab:blue", label="held-out accuracy")
    if hist["step"]:
        ax.plot(hist["step"], hist["train_acc"], color="tab:blue", alpha=0.25, linewidth=0.8, label="train batch")
    ax.axhline(results["chance"], color="gray", linestyle=":", label="chance")
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{results['task']} — {results['mixer']} (length {results['config']['seq_len']})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if by_len:
        ax = axes[0][1]
        lengths = sorted(by_len)
        done = [(L, by_len[L]["accuracy"]) for L in lengths if by_len[L]["accuracy"] is not None]
        if done:
            ax.plot([L for L, _ in done], [a for _, a in done], "o-", color="tab:orange", label=results["mixer"])
        ax.axvline(results["config"]["seq_len"], color="gray", linestyle="--", label="training length")
        ax.axhline(results["chance"], color="gray", linestyle=":", label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("length generalisation")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_lengths(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Accuracy vs evaluation length, one line per run (e.g. Mamba vs attention on induction heads)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        pts = sorted((int(L), e["accuracy"]) for L, e in r["eval_lengths"].items() if e["accuracy"] is not None)
        if pts:
            c = r["config"]
            label = (f"{r['mixer']} (d_model {c['d_model']}" + (f", N={c['d_state']}" if c["d_state"] else "")
                     + f", {r['steps_run']} steps)")
            ax.plot([L for L, _ in pts], [a for _, a in pts], "o-", label=label)
    train_lens = sorted({r["config"]["seq_len"] for r in rows})
    for L in train_lens:
        ax.axvline(L, color="gray", linestyle="--", linewidth=0.8)
    ax.axhline(rows[0]["chance"], color="gray", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (dashed: training length)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{rows[0]['task']}: length generalisation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_sweep(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Accuracy vs d_model, one line per mixer (and d_state), one panel per sequence length."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    seq_lens = sorted({r["config"]["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(5 * len(seq_lens), 4), squeeze=False)
    for ax, L in zip(axes[0], seq_lens):
        groups: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r["config"]["seq_len"] == L:
                label = r["mixer"] + (f" (N={r['config']['d_state']})" if r["config"]["d_state"] else "")
                groups.setdefault(label, []).append((r["config"]["d_model"], r["accuracy"]))
        for label, pts in sorted(groups.items()):
            pts.sort()
            ax.plot([d for d, _ in pts], [a for _, a in pts], "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_model")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{rows[0]['task']}, length {L}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------
def run_task(name: str, mixer: str = "mamba", steps: Optional[int] = None, batch: Optional[int] = None,
             lr: Optional[float] = None, d_model: Optional[int] = None, n_layer: Optional[int] = None,
             d_state: Optional[int] = None, seq_len: Optional[int] = None, seed: int = 0, device: str = "cpu",
             eval_lengths: Optional[Sequence[int]] = None, out: Optional[str | Path] = None, *,
             vocab: Optional[int] = None, n_tokens: Optional[int] = None, n_pairs: Optional[int] = None,
             headdim: Optional[int] = None, num_heads: Optional[int] = None, attn_mlp: bool = True,
             warmup: Optional[int] = None, weight_decay: Optional[float] = None, grad_clip: float = 1.0,
             eval_interval: Optional[int] = None, eval_samples: int = 256, long_eval_tokens: int = 1 << 19,
             min_long_eval_samples: int = 4, eval_chunk: int = 4096, max_attention_len: int = 16384,
             max_full_len: int = 65536, stop_at: Optional[float] = None, max_time: Optional[float] = None,
             threads: Optional[int] = None, ssm_kwargs: Optional[dict[str, Any]] = None, progress: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a `mixer` model from scratch on task `name` and return a results dict (also written as JSON and a PNG
    to `out` when given).

    None arguments take the task's value in `TASK_DEFAULTS` (d_state: `DEFAULT_D_STATE[mixer]`). eval_lengths: extra
    lengths evaluated after training, each with max(min_long_eval_samples, long_eval_tokens // length) sequences
    (capped at eval_samples). stop_at: stop early once the held-out accuracy reaches it (None = run all steps).

    Returned keys: task, mixer, config, n_params, chance, accuracy (final held-out accuracy at seq_len),
    eval_lengths {length: {accuracy, samples, mode, seconds} (accuracy None = skipped, with a reason)}, history
    {step, loss, train_acc, eval_step, eval_acc}, steps_run, train_time_s, wall_time_s, plot, json.
    """
    if threads is not None:
        _check_int("threads", threads)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_task(name, mixer, steps, batch, lr, d_model, n_layer, d_state, seq_len, seed, device,
                            eval_lengths, out, vocab=vocab, n_tokens=n_tokens, n_pairs=n_pairs, headdim=headdim,
                            num_heads=num_heads, attn_mlp=attn_mlp, warmup=warmup, weight_decay=weight_decay,
                            grad_clip=grad_clip, eval_interval=eval_interval, eval_samples=eval_samples,
                            long_eval_tokens=long_eval_tokens, min_long_eval_samples=min_long_eval_samples,
                            eval_chunk=eval_chunk, max_attention_len=max_attention_len, max_full_len=max_full_len,
                            stop_at=stop_at, max_time=max_time, threads=None, ssm_kwargs=ssm_kwargs,
                            progress=progress, log=log)
        finally:
            torch.set_num_threads(previous)
    t_start = time.perf_counter()
    if name not in TASKS:
        raise MambaKitError(f"task NAME must be one of {list(TASKS)}, got {name!r}")
    if mixer not in MIXERS:
        raise MambaKitError(f"--mixer must be one of {list(MIXERS)}, got {mixer!r}")
    d = TASK_DEFAULTS[name]
    steps = d["steps"] if steps is None else steps
    batch = d["batch"] if batch is None else batch
    lr = d["lr"] if lr is None else lr
    d_model = d["d_model"] if d_model is None else d_model
    n_layer = d["n_layer"] if n_layer is None else n_layer
    seq_len = d["seq_len"] if seq_len is None else seq_len
    vocab = d["vocab"] if vocab is None else vocab
    n_tokens = d.get("n_tokens", 16) if n_tokens is None else n_tokens
    n_pairs = d.get("n_pairs", 8) if n_pairs is None else n_pairs
    weight_decay = d.get("weight_decay", 0.1) if weight_decay is None else weight_decay
    eval_lengths = list(d["eval_lengths"] if eval_lengths is None else eval_lengths)
    for key, value in (("steps", steps), ("batch_size", batch), ("d_model", d_model), ("n_layer", n_layer),
                       ("seq_len", seq_len), ("vocab", vocab), ("eval_samples", eval_samples),
                       ("eval_chunk", eval_chunk), ("n_tokens", n_tokens), ("n_pairs", n_pairs),
                       ("min_long_eval_samples", min_long_eval_samples), ("long_eval_tokens", long_eval_tokens),
                       ("max_attention_len", max_attention_len), ("max_full_len", max_full_len)):
        _check_int(key, value)
    _check_int("seed", seed, 0)
    if d_state is not None:
        _check_int("d_state", d_state)
    if eval_interval is not None:
        _check_int("eval_interval", eval_interval)
    if warmup is not None:
        _check_int("warmup", warmup, 0)
    for L in eval_lengths:
        _check_int("eval_lengths", L, 3)
    _check_float("lr", lr)
    _check_float("weight_decay", weight_decay, positive=False)
    _check_float("grad_clip", grad_clip)
    if max_time is not None:
        _check_float("max_time", max_time)
    if stop_at is not None and not (isinstance(stop_at, (int, float)) and 0 < stop_at <= 1):
        raise MambaKitError(f"--stop-at must lie in (0, 1], got {stop_at!r}")
    if name in ("selective-copying", "copying") and seq_len < 2 * n_tokens:
        raise MambaKitError(f"--seq-len must be >= 2 * n_tokens = {2 * n_tokens} for {name}, got {seq_len}")
    if name == "mqar" and seq_len < 3 * n_pairs:
        raise MambaKitError(f"--seq-len must be >= 3 * n_pairs = {3 * n_pairs} for mqar, got {seq_len}")
    if name == "mqar" and n_pairs > vocab // 2 - 1:
        raise MambaKitError(f"--n-pairs must be <= vocab/2 - 1 = {vocab // 2 - 1} for mqar, got {n_pairs}")
    if name == "induction-heads" and seq_len < 3:
        raise MambaKitError(f"--seq-len must be >= 3 for induction-heads, got {seq_len}")
    from mambakit.models.lm import MambaLMHeadModel
    from mambakit.train import param_groups, resolve_device

    dev = resolve_device(device)
    vocab_size = task_vocab_size(name, vocab)
    task_kw = {"vocab": vocab, "n_tokens": n_tokens, "n_pairs": n_pairs}
    d_state_used = None if mixer == "attention" else (d_state or DEFAULT_D_STATE[mixer])
    config = build_model_config(mixer, vocab_size, d_model, n_layer, d_state_used, headdim, num_heads, attn_mlp)
    if ssm_kwargs and mixer != "attention":
        config.ssm_cfg.update(ssm_kwargs)
    eval_interval = eval_interval or max(1, steps // 10)
    warmup = min(100, steps // 10) if warmup is None else warmup

    torch.manual_seed(seed)
    # built on the CPU, then moved: the same initial weights on every device (and S4's parameters are created
    # without a device argument, so building it directly on a GPU leaves some of them on the CPU)
    model = MambaLMHeadModel(config).to(dev)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    g_train = torch.Generator().manual_seed(seed)
    eval_data = _eval_set(name, eval_samples, batch, seq_len, seed, **task_kw)
    chance = {"selective-copying": 1 / vocab, "copying": 1 / vocab, "induction-heads": 1 / vocab,
              "mqar": 1 / (vocab - vocab // 2)}[name]
    cfg_out = {"steps": steps, "batch_size": batch, "lr": lr, "d_model": d_model, "n_layer": n_layer,
               "d_state": d_state_used, "seq_len": seq_len, "seed": seed, "vocab": vocab, "vocab_size": vocab_size,
               "warmup": warmup, "weight_decay": weight_decay, "grad_clip": grad_clip, "eval_interval": eval_interval,
               "eval_samples": eval_samples, "stop_at": stop_at, "max_time": max_time, "device": str(dev),
               "model_config": config.to_dict()}
    if name in ("selective-copying", "copying"):
        cfg_out["n_tokens"] = n_tokens
    if name == "mqar":
        cfg_out["n_pairs"] = n_pairs
    history: dict[str, list] = {"step": [], "loss": [], "train_acc": [], "eval_step": [], "eval_acc": []}
    log(f"{name} / {mixer}: d_model {d_model}, n_layer {n_layer}, d_state {d_state_used}, {n_params:,} parameters, "
        f"{steps} steps of {batch}x{seq_len}, lr {lr}, device {dev}")

    from tqdm import tqdm

    bar = tqdm(total=steps, disable=not progress, dynamic_ncols=True, desc=f"{name}/{mixer}")
    train_time = 0.0
    acc = accuracy_on(model, eval_data, vocab_size, dev)
    history["eval_step"].append(0)
    history["eval_acc"].append(acc)
    done = 0
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup)
            ids, targets = make_batch(name, batch, seq_len, g_train, **task_kw)
            ids, targets = ids.to(dev), targets.to(dev)
            out_ = model(ids, labels=targets)
            optimizer.zero_grad(set_to_none=True)
            out_.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            loss = out_.loss.item()
            if not math.isfinite(loss):
                raise MambaKitError(f"training diverged at step {step + 1} (loss {loss}); try a smaller --lr")
            with torch.no_grad():
                has = targets != IGNORE
                pred = out_.logits[..., :vocab_size].argmax(-1)
                train_acc = float(((pred == targets) & has).sum()) / max(int(has.sum()), 1)
            train_time += time.perf_counter() - t0
            done = step + 1
            history["step"].append(done)
            history["loss"].append(loss)
            history["train_acc"].append(train_acc)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{train_acc:.3f}", eval_acc=f"{acc:.3f}")
            if done % eval_interval == 0 or done == steps:
                acc = accuracy_on(model, eval_data, vocab_size, dev)
                history["eval_step"].append(done)
                history["eval_acc"].append(acc)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{train_acc:.3f}", eval_acc=f"{acc:.3f}")
                msg = (f"step {done}: loss {loss:.4f}, held-out accuracy {acc:.4f} "
                       f"({train_time:.0f} s of training)")
                bar.write(msg) if progress else log(msg)
                if stop_at is not None and acc >= stop_at:
                    msg = f"step {done}: held-out accuracy {acc:.4f} >= stop_at {stop_at}; stopping"
                    bar.write(msg) if progress else log(msg)
                    break
            if max_time is not None and train_time >= max_time and done < steps:
                msg = f"step {done}: {train_time:.0f} s of training >= max_time {max_time}; stopping"
                bar.write(msg) if progress else log(msg)
                break
    finally:
        bar.close()
    if history["eval_step"][-1] != done:
        acc = accuracy_on(model, eval_data, vocab_size, dev)
        history["eval_step"].append(done)
        history["eval_acc"].append(acc)
    log(f"{name} / {mixer}: held-out accuracy at length {seq_len}: {acc:.4f} (chance {chance:.4f}) after {done} "
        f"steps, {train_time:.1f} s of training")

    by_len: dict[str, dict[str, Any]] = {}
    for L in eval_lengths:
        t0 = time.perf_counter()
        mode = eval_mode(mixer, L, eval_chunk)
        limit = max_attention_len if mixer == "attention" else (max_full_len if mixer == "s4" else None)
        if limit is not None and L > limit:
            by_len[str(L)] = {"accuracy": None, "samples": 0, "mode": mode, "seconds": 0.0,
                              "skipped": f"length > {'max_attention_len' if mixer == 'attention' else 'max_full_len'}"
                                         f" = {limit}"}
            log(f"  length {L}: skipped ({by_len[str(L)]['skipped']})")
            continue
        if L == seq_len:
            n, acc_L = eval_samples, acc
        else:
            n = min(eval_samples, max(min_long_eval_samples, long_eval_tokens // L))
            eval_batch = max(1, min(batch, n, EVAL_BATCH_TOKENS // L))
            chunk = eval_chunk
            if mode == "kv":  # keep the (batch, heads, chunk, L) attention scores of one chunk near 2^26 numbers
                heads = config.attn_cfg.get("num_heads", 1)
                chunk = max(1, min(eval_chunk, (1 << 26) // (eval_batch * heads * L)))
            data = _eval_set(name, n, eval_batch, L, seed, **task_kw)
            acc_L = accuracy_on(model, data, vocab_size, dev, mode=mode, chunk=chunk)
        by_len[str(L)] = {"accuracy": acc_L, "samples": n, "mode": mode, "seconds": time.perf_counter() - t0}
        log(f"  length {L}: accuracy {acc_L:.4f} ({n} sequences, {mode} mode, {by_len[str(L)]['seconds']:.1f} s)")

    results: dict[str, Any] = {
        "task": name, "mixer": mixer, "config": cfg_out, "n_params": n_params, "chance": chance, "accuracy": acc,
        "eval_lengths": by_len, "history": history, "steps_run": done, "train_time_s": train_time,
        "threads": torch.get_num_threads(),
        "wall_time_s": time.perf_counter() - t_start, "plot": None, "json": None,
    }
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{name}_{mixer}"
        png = out_dir / f"{stem}.png"
        if plot_results(results, png):
            results["plot"] = str(png)
        results["json"] = str(out_dir / f"{stem}.json")
        results["wall_time_s"] = time.perf_counter() - t_start
        Path(results["json"]).write_text(json.dumps(results, indent=1) + "\n")
    return results


def run_sweep(name: str, mixers: Sequence[str], d_models: Sequence[int], seq_lens: Sequence[int],
              out: Optional[str | Path] = None, d_states: Optional[Sequence[Optional[int]]] = None,
              log: Callable[[str], None] = print, **kwargs: Any) -> list[dict[str, Any]]:
    """`run_task` over every (mixer, d_state, seq_len, d_model) combination (e.g. the MQAR sweep of the Mamba-2
    paper); writes `<name>_sweep.png` and `<name>_sweep.json` to `out`. Returns the per-run results."""
    rows = []
    for mixer in mixers:
        for d_state in ([None] if mixer == "attention" else (d_states or [None])):
            for L in seq_lens:
                for dm in d_models:
                    r = run_task(name, mixer, d_model=dm, seq_len=L, d_state=d_state, out=None, log=log, **kwargs)
                    rows.append(r)
    if out is not None and rows:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_sweep(rows, out_dir / f"{name}_sweep.png")
        if any(r["eval_lengths"] for r in rows):
            plot_lengths(rows, out_dir / f"{name}_lengths.png")
        table = [{"mixer": r["mixer"], "d_model": r["config"]["d_model"], "d_state": r["config"]["d_state"],
                  "seq_len": r["config"]["seq_len"], "accuracy": r["accuracy"], "n_params": r["n_params"],
                  "steps_run": r["steps_run"], "wall_time_s": r["wall_time_s"]} for r in rows]
        (out_dir / f"{name}_sweep.json").write_text(json.dumps(table, indent=1) + "\n")
    return rows
