"""Train a small model from scratch on one synthetic task and measure its accuracy (``mambakit tasks``).

`run_task` builds a `MambaLMHeadModel` whose mixers are S4 (LTI), Mamba-1, Mamba-2 or attention, trains it with AdamW
(linear warmup, cosine decay, gradient clipping) on freshly generated batches, evaluates the accuracy on a fixed
held-out set every `eval_interval` steps, and for induction heads also at other lengths (`eval_lengths`). SSM models are
evaluated at long lengths in their constant-memory recurrent mode: the sequence is fed chunk by chunk through an
inference cache (exact for SSM mixers), so memory does not grow with the length. Attention evaluates through its
KV cache (memory and time grow with the length: lengths above `max_attention_len` are skipped) and S4 over the whole
sequence at once (its cached path is a per-token loop: lengths above `max_full_len` are skipped).

The step loop is `mambakit.training.run_loop`; the options are a `TaskConfig` (`mambakit.tasks.config`), evaluation
lives in `mambakit.tasks.evaluation`, plots in `mambakit.tasks.plots`.

The model families are compared like for like: same d_model and n_layer; SSM blocks are the Mamba block with only the
SSM changed (S4 / S6 / SSD); the attention model is a Transformer (attention + gated MLP of width 2·d_model, rounded
up to 128 by the model), which gives it somewhat *more* parameters than the SSM models at the default sizes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from mambakit.layers.registry import mixer_spec
from mambakit.models.memory import check_fits, training_bytes
from mambakit.tasks.config import (  # noqa: F401  (DEFAULT_D_STATE, MIXERS, mamba2_headdim: re-exported)
    DEFAULT_D_STATE,
    MIXERS,
    TASK_DEFAULTS,
    TaskConfig,
    build_model_config,
    mamba2_headdim,
    resolve_task_config,
    task_kwargs,
    task_label,
)
from mambakit.tasks.evaluation import (  # noqa: F401  (re-exported: the names lived here)
    EVAL_BATCH_TOKENS,
    accuracy_on,
    count_correct,
    eval_mode,
    eval_set,
    evaluate_lengths,
)
from mambakit.tasks.generators import IGNORE, STATE_TRACKING, chance_accuracy, make_batch, task_vocab_size
from mambakit.tasks.plots import plot_lengths, plot_results, plot_sweep  # noqa: F401
from mambakit.training import LoopConfig, StepRecord, adamw, lr_at, param_groups, resolve_device, run_loop  # noqa: F401

#: AdamW of the task models.
BETAS, EPS = (0.9, 0.95), 1e-8


def run_task(name: str, mixer: str = "mamba", *, log: Callable[[str], None] = print, **options: Any) -> dict[str, Any]:
    """Train a `mixer` model from scratch on task `name` and return a results dict (also written as JSON and a PNG
    to `options["out"]` when given). The options are the fields of `TaskConfig`; None values take the task's value
    in `TASK_DEFAULTS`. With `threads`, torch uses that many CPU threads during the run (restored afterwards).

    Returned keys: task, mixer, config, n_params, chance, accuracy (final held-out accuracy at seq_len),
    eval_lengths {length: {accuracy, samples, mode, seconds} (accuracy None = skipped, with a reason)}, history
    {step, loss, train_acc, eval_step, eval_acc}, steps_run, threads, train_time_s, wall_time_s, plot, json.
    """
    cfg = resolve_task_config(TaskConfig(name, mixer, **options))
    if cfg.threads is None:
        return train_task(cfg, log)
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return train_task(cfg, log)
    finally:
        torch.set_num_threads(previous)


def train_task(cfg: TaskConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`run_task` for a resolved config (`resolve_task_config`), in torch's current thread setting."""
    from mambakit.models.lm import MambaLMHeadModel

    t_start = time.perf_counter()
    name, mixer = cfg.name, cfg.mixer
    dev = resolve_device(cfg.device)
    vocab_size = task_vocab_size(name, cfg.vocab)
    task_kw, held_out_kw = task_kwargs(cfg), task_kwargs(cfg, held_out=True)
    spec = mixer_spec(mixer)
    d_state_used = (cfg.d_state or spec.d_state) if spec.ssm else None
    config = build_model_config(mixer, vocab_size, cfg.d_model, cfg.n_layer, d_state_used, cfg.headdim,
                                cfg.num_heads, cfg.attn_mlp)
    if cfg.dt_init is not None and spec.ssm:
        config.ssm_cfg.update(dt_min=cfg.dt_init[0], dt_max=cfg.dt_init[1])
    if cfg.ssm_kwargs and spec.ssm:
        config.ssm_cfg.update(cfg.ssm_kwargs)
    need = training_bytes(config, cfg.batch, cfg.seq_len) + 2 * 8 * cfg.eval_samples * cfg.seq_len  # + eval (x, y)
    check_fits(need, dev, f"task {name} with d_model {config.d_model}, n_layer {config.n_layer}, vocabulary "
               f"{config.vocab_size} on batches of {cfg.batch} x {cfg.seq_len} tokens",
               hint="lower --d-model, --n-layer, --vocab, --batch-size, --seq-len or --eval-samples")
    eval_interval = cfg.eval_interval or max(1, cfg.steps // 10)
    warmup = min(100, cfg.steps // 10) if cfg.warmup is None else cfg.warmup

    torch.manual_seed(cfg.seed)
    # built on the CPU, then moved: the same initial weights on every device (and S4's parameters are created
    # without a device argument, so building it directly on a GPU leaves some of them on the CPU)
    model = MambaLMHeadModel(config).to(dev)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = adamw(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=BETAS, eps=EPS)
    g_train = torch.Generator().manual_seed(cfg.seed)
    eval_data = eval_set(name, cfg.eval_samples, cfg.batch, cfg.seq_len, cfg.seed, **held_out_kw)
    chance = chance_accuracy(name, cfg.vocab)
    cfg_out = {"steps": cfg.steps, "batch_size": cfg.batch, "lr": cfg.lr, "d_model": cfg.d_model,
               "n_layer": cfg.n_layer, "d_state": d_state_used, "seq_len": cfg.seq_len, "seed": cfg.seed,
               "vocab": cfg.vocab, "vocab_size": vocab_size, "warmup": warmup, "weight_decay": cfg.weight_decay,
               "grad_clip": cfg.grad_clip,
               "dt_init": None if cfg.dt_init is None else list(cfg.dt_init), "eval_interval": eval_interval,
               "eval_samples": cfg.eval_samples,
               "stop_at": cfg.stop_at, "max_time": cfg.max_time, "device": str(dev),
               "model_config": config.to_dict()}
    if name in ("selective-copying", "copying"):
        cfg_out["n_tokens"] = cfg.n_tokens
    if name == "mqar":
        cfg_out["n_pairs"] = cfg.n_pairs
    if name in STATE_TRACKING:
        cfg_out.update(brackets=cfg.brackets, supervision=cfg.supervision)
    if name == "modular-arithmetic":
        cfg_out.update(order=cfg.order, bracket_form=cfg.bracket_form)
    name = task_label(cfg)
    history: dict[str, list] = {"step": [], "loss": [], "train_acc": [], "eval_step": [], "eval_acc": []}
    log(f"{name} / {mixer}: d_model {cfg.d_model}, n_layer {cfg.n_layer}, d_state {d_state_used}, "
        f"{n_params:,} parameters, {cfg.steps} steps of {cfg.batch}x{cfg.seq_len}, lr {cfg.lr}, device {dev}")

    def held_out(step: int) -> float:
        acc = accuracy_on(model, eval_data, vocab_size, dev)
        history["eval_step"].append(step)
        history["eval_acc"].append(acc)
        return acc

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, targets = batch[0].to(dev), batch[1].to(dev)
        out = model(ids, labels=targets)
        with torch.no_grad():
            has = targets != IGNORE
            pred = out.logits[..., :vocab_size].argmax(-1)
            train_acc = float(((pred == targets) & has).sum()) / max(int(has.sum()), 1)
        return out.loss, {"acc": train_acc}

    def after_step(r: StepRecord) -> None:
        history["step"].append(r.step)
        history["loss"].append(r.loss)
        history["train_acc"].append(r.metrics["acc"])

    def evaluate(r: StepRecord) -> tuple[float, str]:
        acc = held_out(r.step)
        return acc, (f"step {r.step}: loss {r.loss:.4f}, held-out accuracy {acc:.4f} "
                     f"({r.train_time_s:.0f} s of training)")

    def stop(r: StepRecord, acc: float) -> Optional[str]:
        if cfg.stop_at is not None and acc >= cfg.stop_at:
            return f"step {r.step}: held-out accuracy {acc:.4f} >= stop_at {cfg.stop_at}; stopping"
        return None

    held_out(0)
    loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=warmup, min_lr_ratio=0.1, grad_clip=cfg.grad_clip,
                      eval_interval=eval_interval, max_time_s=cfg.max_time, progress=cfg.progress,
                      desc=f"{name}/{mixer}")
    run = run_loop(loop, optimizer, micro_batches=lambda step: [make_batch(cfg.name, cfg.batch, cfg.seq_len,
                                                                           g_train, **task_kw)],
                   loss_fn=loss_fn, clip_params=model.parameters, after_step=after_step, evaluate=evaluate, stop=stop,
                   postfix=lambda r: {"loss": f"{r.loss:.3f}", "acc": f"{r.metrics['acc']:.3f}",
                                      "eval_acc": f"{history['eval_acc'][-1]:.3f}"},
                   log=log)
    done, train_time = run.done, run.train_time_s
    if history["eval_step"][-1] != done:
        held_out(done)
    acc = history["eval_acc"][-1]
    log(f"{name} / {mixer}: held-out accuracy at length {cfg.seq_len}: {acc:.4f} (chance {chance:.4f}) after {done} "
        f"steps, {train_time:.1f} s of training")
    by_len = evaluate_lengths(model, cfg, config, vocab_size, acc, dev, log)

    results: dict[str, Any] = {
        "task": name, "mixer": mixer, "config": cfg_out, "n_params": n_params, "chance": chance, "accuracy": acc,
        "eval_lengths": by_len, "history": history, "steps_run": done, "train_time_s": train_time,
        "threads": torch.get_num_threads(),
        "wall_time_s": time.perf_counter() - t_start, "plot": None, "json": None,
    }
    if cfg.out is not None:
        out_dir = Path(cfg.out)
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
        name = rows[0]["task"]  # with brackets: modular-arithmetic-brackets
        plot_sweep(rows, out_dir / f"{name}_sweep.png")
        if any(r["eval_lengths"] for r in rows):
            plot_lengths(rows, out_dir / f"{name}_lengths.png")
        table = [{"mixer": r["mixer"], "d_model": r["config"]["d_model"], "d_state": r["config"]["d_state"],
                  "seq_len": r["config"]["seq_len"], "accuracy": r["accuracy"], "n_params": r["n_params"],
                  "steps_run": r["steps_run"], "wall_time_s": r["wall_time_s"],
                  "eval_lengths": {L: e["accuracy"] for L, e in r["eval_lengths"].items()}} for r in rows]
        (out_dir / f"{name}_sweep.json").write_text(json.dumps(table, indent=1) + "\n")
    return rows
