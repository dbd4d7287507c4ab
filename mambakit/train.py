"""The training loop behind ``mambakit train``: a byte-level Mamba LM on a text corpus.

The step loop is `mambakit.training.run_loop`; this module supplies the LM's data, loss, evaluation and
checkpoints: AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup then cosine decay to
lr·min_lr_ratio, gradient clipping, a validation loss on a fixed set of held-out batches every `eval_interval`
steps, atomic checkpoints (`mambakit.models.checkpoint`) that ``--resume`` continues from, a loss-curve PNG and a
generated sample.

Under ``torchrun`` (or ``mambakit train --nproc N``) the same loop runs data-parallel (`mambakit.distributed`):
DDP, or FSDP2 with ``fsdp=True``. ``batch_size`` is always the global batch; each rank takes a disjoint share,
split into ``grad_accum`` micro-batches, so the run follows the single-process one (same batches, same
updates up to float rounding). Rank 0 logs and writes the (consolidated) checkpoint, which resumes at any
world size.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mambakit.data import BatchSampler, ByteTokenizer, bytes_to_tensor, load_text_corpus, split_train_val
from mambakit.distributed.data_parallel import (
    DataParallelConfig,
    consolidated_state,
    gradient_sync,
    mean_over_ranks,
    shard_optimizer_state,
    unwrap,
    wrap_model,
)
from mambakit.distributed.launch import DistContext, barrier, setup_distributed, teardown
from mambakit.distributed.sampler import ShardedBatchSampler, check_batch_split
from mambakit.errors import CheckpointError, MambaKitError
from mambakit.layers.registry import default_d_state as _registry_d_state
from mambakit.layers.registry import default_headdim, mixer_spec
from mambakit.models.checkpoint import (
    load_checkpoint,
    load_config,
    load_optimizer_state,
    load_trainer_state,
    save_checkpoint,
)
from mambakit.models.config import MambaConfig
from mambakit.models.generation import MAX_NEW_TOKENS
from mambakit.models.memory import check_fits, training_bytes
from mambakit.models.io.atomic import tidy
from mambakit.models.io.names import CONFIG_NAME
# param_groups and resolve_device live in mambakit.training; importing them from here keeps working
from mambakit.training import LoopConfig, StepRecord, adamw, param_groups, precision_context, resolve_device, run_loop
from mambakit.training import lr_at as _lr_at
from mambakit.training.lock import exclusive

#: The --arch spellings of the LM trainer -> mixer names of `mambakit.layers.registry`.
ARCHS = {arch: mixer_spec(arch).name for arch in ("mamba1", "mamba2", "mamba3")}
#: AdamW of the LM trainer.
BETAS, EPS = (0.9, 0.95), 1e-8
CHECKPOINT_SUBDIR = "checkpoint"

#: Defaults of `TrainArgs` fields left as None. Sized for the built-in corpus on a 2-core CPU: a few minutes.
DEFAULTS: dict[str, Any] = {
    "data": None,
    "steps": 600,
    "d_model": 256,
    "n_layer": 2,
    "d_state": None,  # 16 for mamba1, 64 for mamba2 (see `default_d_state`)
    "arch": "mamba1",
    "seq_len": 256,
    "batch_size": 8,  # the global batch: all ranks and micro-batches together
    "grad_accum": 1,
    "lr": 3e-3,
    "warmup_steps": None,  # min(100, steps // 10)
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "eval_interval": 100,
    "eval_batches": 8,
    "save_interval": None,  # = eval_interval
    "seed": 0,
    "device": "auto",
    "sample_prompt": "def ",
    "sample_tokens": 200,
}
#: Fields that fix the model's shape: on --resume they come from the checkpoint and must not contradict it.
MODEL_FIELDS = ("d_model", "n_layer", "d_state", "arch")
#: Fields that belong to one launch (never taken from the run being resumed).
LAUNCH_FIELDS = ("out", "resume", "progress", "fsdp", "bf16", "overwrite")


@dataclass
class TrainArgs:
    """Options of a training run. None means: the stored value when resuming, else `DEFAULTS`."""

    out: str = "runs/mamba"
    resume: bool = False
    progress: bool = True
    data: str | None = None
    steps: int | None = None
    d_model: int | None = None
    n_layer: int | None = None
    d_state: int | None = None
    arch: str | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    eval_interval: int | None = None
    eval_batches: int | None = None
    save_interval: int | None = None
    seed: int | None = None
    device: str | None = None
    sample_prompt: str | None = None
    sample_tokens: int | None = None
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    bf16: bool = False  # bf16 autocast with fp32 master weights (CUDA only)
    cuda_graph: bool = False  # forward + loss + backward replayed as one CUDA graph (one device, no accumulation)
    overwrite: bool = False  # without --resume, replace a checkpoint already in --out (else refused)


def default_d_state(arch: str) -> int:
    """The state size used when --d-state is not given: 16 for Mamba-1, 64 for Mamba-2 (the registry's)."""
    if arch not in ARCHS:
        raise MambaKitError(f"--arch must be one of {sorted(ARCHS)}, got {arch!r}")
    return _registry_d_state(arch)


def resolve_args(args: TrainArgs, stored: dict[str, Any] | None = None) -> TrainArgs:
    """Fill None fields from `stored` (a resumed run's arguments), then from `DEFAULTS`; validate the result."""
    stored = stored or {}
    out = TrainArgs(**{name: getattr(args, name) for name in LAUNCH_FIELDS})
    for f in fields(TrainArgs):
        if f.name in LAUNCH_FIELDS:
            continue
        value = getattr(args, f.name)
        if value is None:
            value = stored.get(f.name, DEFAULTS[f.name])
        setattr(out, f.name, value)
    if out.d_state is None:
        out.d_state = default_d_state(out.arch)
    if out.warmup_steps is None:
        out.warmup_steps = min(100, out.steps // 10)
    if out.save_interval is None:
        out.save_interval = out.eval_interval
    validate_args(out)
    return out


def validate_args(args: TrainArgs) -> None:
    """Raise `MambaKitError` naming the first option with an invalid value."""
    for name in ("steps", "d_model", "n_layer", "d_state", "seq_len", "batch_size", "grad_accum", "eval_interval",
                 "eval_batches", "save_interval"):
        value = getattr(args, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise MambaKitError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    for name in ("warmup_steps", "sample_tokens"):
        value = getattr(args, name)
        if not isinstance(value, int) or value < 0:
            raise MambaKitError(f"--{name.replace('_', '-')} must be an integer >= 0, got {value!r}")
    if not (isinstance(args.lr, (int, float)) and math.isfinite(args.lr) and args.lr > 0):
        raise MambaKitError(f"--lr must be a positive number, got {args.lr!r}")
    if not (isinstance(args.grad_clip, (int, float)) and args.grad_clip > 0):
        raise MambaKitError(f"--grad-clip must be a positive number, got {args.grad_clip!r}")
    wd = args.weight_decay
    if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
        raise MambaKitError(f"--weight-decay must be a number >= 0, got {args.weight_decay!r}")
    if not 0 <= args.min_lr_ratio <= 1:
        raise MambaKitError(f"min_lr_ratio must lie in [0, 1], got {args.min_lr_ratio!r}")
    if args.arch not in ARCHS:
        raise MambaKitError(f"--arch must be one of {sorted(ARCHS)}, got {args.arch!r}")
    if args.sample_tokens > MAX_NEW_TOKENS:
        raise MambaKitError(f"--sample-tokens must be at most {MAX_NEW_TOKENS}, got {args.sample_tokens}")
    if not args.sample_prompt and args.sample_tokens:
        raise MambaKitError("the sample prompt must not be empty")
    if args.cuda_graph:
        on_cuda = str(args.device).startswith("cuda") if args.device else torch.cuda.is_available()
        if not on_cuda:
            raise MambaKitError(f"--cuda-graph needs a CUDA device, got --device {args.device or 'cpu (no CUDA)'}")
        if args.grad_accum > 1:
            raise MambaKitError(f"--cuda-graph runs without gradient accumulation, got --grad-accum {args.grad_accum}")


def build_config(args: TrainArgs, vocab_size: int = 256) -> MambaConfig:
    """The `MambaConfig` of a new model for these (resolved) arguments."""
    layer = ARCHS[args.arch]
    ssm_cfg: dict[str, Any] = {"layer": layer, "d_state": args.d_state}
    if mixer_spec(layer).has_heads:
        if args.d_model % 8:  # d_inner = 2 * d_model: a head size of at least 16 divides it
            raise MambaKitError(f"--arch {args.arch} needs --d-model to be a multiple of 8, got {args.d_model}")
        ssm_cfg.update(headdim=default_headdim(2 * args.d_model), chunk_size=64)
    return MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=vocab_size, ssm_cfg=ssm_cfg)


def lr_at(step: int, args: TrainArgs) -> float:
    """Learning rate of (0-based) `step`: linear warmup over `warmup_steps`, then cosine down to lr·min_lr_ratio."""
    return _lr_at(step, args.steps, args.lr, args.warmup_steps, args.min_lr_ratio)


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of the model on inputs `x` and targets `y`, both (batch, seqlen).

    fused: computed chunk by chunk without the logits (`forward(return_logits=False)`, the same value and gradients
    to float rounding, none of the (batch, seqlen, vocab) logits in memory); False: from the model's logits."""
    if fused:
        return model(x, labels=y, return_logits=False).loss
    logits = model(x).logits  # (batch, seqlen, padded_vocab)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """Mean loss over fixed validation batches (model put back in its previous train/eval mode)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        total += lm_loss(model, x.to(device), y.to(device)).item()
    model.train(was_training)
    return total / len(batches)


def plot_losses(history: dict[str, list], path: Path) -> bool:
    """Write the loss curves (train, smoothed, and validation) to a PNG; False when matplotlib is missing."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if history["train"]:
        steps, losses = zip(*history["train"])
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        smooth, ema = [], losses[0]
        for v in losses:
            ema = 0.95 * ema + 0.05 * v
            smooth.append(ema)
        ax.plot(steps, smooth, color="tab:blue", label="train (EMA)")
    if history["val"]:
        steps, losses = zip(*history["val"])
        ax.plot(steps, losses, "o-", color="tab:orange", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title("mambakit train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


@torch.no_grad()
def generate_sample(model: torch.nn.Module, prompt: str, max_new_tokens: int, seed: int, device: torch.device) -> str:
    """Prompt plus a sampled continuation (temperature 0.8, top-p 0.95), decoded as bytes."""
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode(prompt)], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    out = model.generate(ids, max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, seed=seed)
    model.train(was_training)
    return tok.decode(out[0].tolist())


def _prepare_data(args: TrainArgs, log: Callable[[str], None]) -> tuple[BatchSampler, list]:
    raw = load_text_corpus(args.data)
    train_bytes, val_bytes = split_train_val(raw)
    source = args.data if args.data is not None else "built-in corpus (Python standard library sources)"
    log(f"data: {source}: {len(raw):,} bytes ({len(train_bytes):,} train, {len(val_bytes):,} validation)")
    if len(val_bytes) < args.seq_len + 1:
        raise MambaKitError(
            f"the validation split ({len(val_bytes)} bytes, the last 5% of the data) is shorter than "
            f"--seq-len + 1 = {args.seq_len + 1}; use more data or a smaller --seq-len"
        )
    sampler = BatchSampler(bytes_to_tensor(train_bytes), args.batch_size, args.seq_len, seed=args.seed)
    val_sampler = BatchSampler(bytes_to_tensor(val_bytes), args.batch_size, args.seq_len, seed=args.seed + 7919)
    val_batches = [val_sampler.batch(i) for i in range(args.eval_batches)]
    return sampler, val_batches


def _check_resume_shape(args: TrainArgs, config: MambaConfig) -> None:
    """Explicit model-shape options must agree with the checkpoint being resumed."""
    arch = {v: k for k, v in ARCHS.items()}[config.mixer_layer]
    have = {"d_model": config.d_model, "n_layer": config.n_layer, "arch": arch,
            "d_state": config.ssm_cfg.get("d_state", default_d_state(arch))}
    for name in MODEL_FIELDS:
        given = getattr(args, name)
        if given is not None and given != have[name]:
            raise MambaKitError(
                f"--{name.replace('_', '-')} {given} does not match the checkpoint being resumed "
                f"({name} = {have[name]}); drop the option or train into a new --out"
            )


def _load_optimizer(optimizer: torch.optim.Optimizer, opt_state: dict[str, Any], dp: DataParallelConfig,
                    ckpt_dir: Path) -> None:
    """Load a stored optimizer state; CheckpointError when it does not fit the model (other groups, parameters or
    shapes) instead of torch's error at load or at the first step."""
    fail = f"the optimizer state in {str(ckpt_dir)!r} does not fit this model"
    try:
        optimizer.load_state_dict(shard_optimizer_state(opt_state, optimizer, dp))
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{fail}: {exc}; delete its optimizer.pt to resume with a fresh optimizer") from exc
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                    raise CheckpointError(f"{fail}: {name} has shape {tuple(value.shape)} for a parameter of "
                                          f"shape {tuple(p.shape)}; delete its optimizer.pt to resume with a fresh "
                                          "optimizer")


def train(args: TrainArgs, log: Callable[[str], None] = print,
          on_checkpoint: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns a summary: losses, tokens/s, steps, wall time, checkpoint, sample.

    Started by torchrun (or inside an initialised process group), the run is data-parallel over all ranks;
    only rank 0 logs and writes files. `on_checkpoint(step)` is called on every rank after each checkpoint.
    """
    t_start = time.perf_counter()
    # rank 0 alone holds the lock of --out (torchrun's RANK, or a process group initialised by the caller)
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    main_rank = (torch.distributed.get_rank() == 0) if group else os.environ.get("RANK", "0") == "0"
    with exclusive(Path(args.out)) if main_rank else contextlib.nullcontext() as taken_over:
        if taken_over:
            log(f"took over the lock of --out {args.out!r} from {taken_over}, which is no longer running")
        args, state = resolve_run(args)
        ctx = setup_distributed(args.device)
        try:
            return _train(args, state, ctx, log if ctx.is_main else (lambda message: None), on_checkpoint, t_start)
        finally:
            teardown(ctx)


def resolve_run(args: TrainArgs) -> tuple[TrainArgs, dict[str, Any]]:
    """The resolved arguments and, with --resume, the stored trainer state (else {})."""
    ckpt_dir = Path(args.out) / CHECKPOINT_SUBDIR
    state: dict[str, Any] = {}
    if args.resume:
        tidy(ckpt_dir)  # what a killed save left: deleted, or the newest complete checkpoint renamed back
        stored_state = load_trainer_state(ckpt_dir) if ckpt_dir.exists() else None
        if stored_state is None:
            raise MambaKitError(f"--resume: no checkpoint with trainer state in {str(ckpt_dir)!r}")
        state = stored_state
        stored_args = state.get("args", {})
        _check_resume_shape(args, load_config(ckpt_dir))
        args = resolve_args(args, {k: v for k, v in stored_args.items() if k not in MODEL_FIELDS})
    else:
        if (ckpt_dir / CONFIG_NAME).exists() and not args.overwrite:
            step = (load_trainer_state(ckpt_dir) or {}).get("step")
            raise MambaKitError(f"--out {args.out!r} already holds a checkpoint" + (f" (step {step})" if step else "")
                                + "; continue it with --resume, replace it with --overwrite, or choose another --out")
        args = resolve_args(args)
    return args, state


def _check_memory(args: TrainArgs, config: MambaConfig, micro_batch: int, device: torch.device, shards: int) -> None:
    """Refuse, before anything is allocated, a run whose sizes cannot fit this device (`mambakit.models.memory`)."""
    need = training_bytes(config, micro_batch, args.seq_len, bf16=args.bf16, shards=shards, fused_loss=True)
    need += 2 * 8 * args.eval_batches * args.batch_size * (args.seq_len + 1)  # the held-out (x, y) int64 batches
    check_fits(need, device, f"training d_model {config.d_model}, n_layer {config.n_layer} on micro-batches of "
               f"{micro_batch} x {args.seq_len} bytes",
               hint="lower --d-model, --n-layer, --seq-len, --batch-size or --eval-batches (or raise --grad-accum)")


def _check_cuda_graph(args: TrainArgs, device: torch.device, ctx: DistContext) -> None:
    """What validate_args cannot see: the resolved device and the process count."""
    if args.cuda_graph and (device.type != "cuda" or ctx.distributed):
        raise MambaKitError(f"--cuda-graph runs in one process on a CUDA device, got {ctx.world_size} rank(s) on "
                            f"{device}")


def _graphed_forward_backward(model: torch.nn.Module, args: TrainArgs,
                              device: torch.device) -> Callable[[tuple], torch.Tensor]:
    """The LM step's forward + loss + backward as one CUDA graph, captured on the first batch (every batch of a
    run has the same shape)."""
    from mambakit.training.cuda_graph import GraphedStep

    graphed: list[GraphedStep] = []

    def forward_backward(xy: tuple) -> torch.Tensor:
        x, y = xy[0].to(device), xy[1].to(device)
        if not graphed:
            graphed.append(GraphedStep(lambda a, b: lm_loss(model, a, b), model.parameters(), (x, y),
                                       autocast_dtype=torch.bfloat16 if args.bf16 else None))
        return graphed[0](x, y)

    return forward_backward


def _finished_run(out_dir: Path, step: int, steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    """A --resume of a run already at --steps: nothing is trained, loaded or written; the summary of the run that
    reached that step (its summary.json) is returned unchanged ({"steps": step} when the file is missing)."""
    log(f"checkpoint is already at step {step} >= --steps {steps}; nothing to train (run files left unchanged)")
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {"steps": step}
    return summary if isinstance(summary, dict) else {"steps": step}


def _train(args: TrainArgs, state: dict[str, Any], ctx: DistContext, log: Callable[[str], None],
           on_checkpoint: Callable[[int], None] | None, t_start: float) -> dict[str, Any]:
    out_dir = Path(args.out)
    ckpt_dir = out_dir / CHECKPOINT_SUBDIR
    start_step = int(state.get("step", 0))
    if args.resume and start_step >= args.steps:
        return _finished_run(out_dir, start_step, args.steps, log)
    device = resolve_device(args.device) if not ctx.distributed else ctx.device
    dp = DataParallelConfig(ctx, fsdp=args.fsdp)
    micro_batch = check_batch_split(args.batch_size, ctx.world_size, args.grad_accum)
    _check_memory(args, load_config(ckpt_dir) if args.resume else build_config(args), micro_batch, device,
                  shards=ctx.world_size if args.fsdp else 1)
    precision = precision_context(args.bf16, device)
    _check_cuda_graph(args, device, ctx)
    global_sampler, val_batches = _prepare_data(args, log)
    sampler = ShardedBatchSampler(global_sampler, ctx.rank, ctx.world_size, args.grad_accum)
    from mambakit.models.lm import MambaLMHeadModel  # imported late: models/lm.py imports the layers and ops

    if args.resume:
        inner = load_checkpoint(ckpt_dir, device=device)
        config = inner.config
        args.d_model, args.n_layer = config.d_model, config.n_layer
        args.arch = {v: k for k, v in ARCHS.items()}[config.mixer_layer]
        args.d_state = config.ssm_cfg.get("d_state", default_d_state(args.arch))
    else:
        config = build_config(args)
        torch.manual_seed(args.seed)
        inner = MambaLMHeadModel(config, device=device)
    inner.train()
    # byte tokens (0..255) always lie in the vocabulary: no per-step read of their values (a host sync on CUDA)
    inner.check_values = inner.config.padded_vocab_size < 256
    n_params = sum(p.numel() for p in inner.parameters())
    model = wrap_model(inner, dp)  # DDP wrapper, or `inner` itself (sharded in place by FSDP2, or single)
    optimizer = adamw(param_groups(inner, args.weight_decay), lr=args.lr, betas=BETAS, eps=EPS)
    if args.resume:
        opt_state = load_optimizer_state(ckpt_dir, map_location=device)
        if opt_state is not None:
            _load_optimizer(optimizer, opt_state, dp, ckpt_dir)
        log(f"resumed from {ckpt_dir} at step {state['step']}")
        before = state.get("args", {}).get("steps")
        if isinstance(before, int) and before != args.steps and start_step < args.steps:
            was = _lr_at(start_step, before, args.lr, args.warmup_steps, args.min_lr_ratio)
            log(f"note: --steps {args.steps} differs from the {before} this run was started with: the learning-rate "
                f"schedule (warmup {args.warmup_steps}, cosine to lr*{args.min_lr_ratio}) now ends at step "
                f"{args.steps}, so step {start_step + 1} runs at lr {lr_at(start_step, args):.2e} instead of "
                f"{was:.2e}; the result differs from a {args.steps}-step run from scratch")
    log(f"model: {args.arch}, d_model {config.d_model}, n_layer {config.n_layer}, d_state {args.d_state}, "
        f"{n_params:,} parameters; device {device}; {args.steps} steps of {args.batch_size}x{args.seq_len} bytes")
    if ctx.distributed or args.grad_accum > 1:
        log(f"parallel: {dp.mode} over {ctx.world_size} rank(s) ({ctx.backend or 'no backend'}); per rank "
            f"{args.grad_accum} micro-batch(es) of {micro_batch} sequences; global batch {args.batch_size}"
            + ("; bf16 autocast, fp32 master weights" if args.bf16 else ""))
    eval_model = unwrap(model) if dp.mode != "fsdp" else model  # FSDP2 forwards are collective: all ranks run them

    def run_eval() -> float:
        dp.counter.active = False
        with precision:
            value = evaluate(eval_model, val_batches, device)
        dp.counter.active = True
        return value

    history: dict[str, list] = state.get("history") or {"train": [], "val": []}
    # training time and tokens of the steps before this launch (a resumed run); the loop counts this launch's
    time_before = float(state.get("train_time_s", 0.0))
    tokens_per_step = args.batch_size * args.seq_len
    run_totals = {"train_time": time_before, "tokens_seen": int(state.get("tokens_seen", 0)), "comm_per_step": {}}
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if start_step == 0 and not history["val"]:
        history["val"].append((0, run_eval()))
        log(f"step 0: validation loss {history['val'][-1][1]:.4f}")

    def checkpoint(step: int, collective: bool = True) -> None:
        trainer_state = {"step": step, "seed": args.seed, "args": asdict(args), "history": history,
                         "train_time_s": run_totals["train_time"], "tokens_seen": run_totals["tokens_seen"],
                         "world_size": ctx.world_size, "parallel": dp.mode,
                         "rng": "batches depend only on (seed, step); no generator state is needed"}
        if dp.mode == "fsdp" or ctx.is_main:  # FSDP2 gathers its shards: a collective of all ranks
            model_state, opt_state = consolidated_state(model, optimizer, dp)
        if ctx.is_main:
            save_checkpoint(inner, ckpt_dir, trainer_state=trainer_state, model_state=model_state,
                            optimizer_state=opt_state)
        if collective:
            barrier(ctx)
        if on_checkpoint is not None:
            on_checkpoint(step)

    def after_step(record: StepRecord) -> None:
        run_totals["comm_per_step"] = dp.counter.snapshot()
        run_totals["train_time"] = time_before + record.train_time_s
        run_totals["tokens_seen"] += tokens_per_step
        history["train"].append((record.step, record.loss))

    def eval_hook(record: StepRecord) -> tuple[float, str]:
        val = run_eval()
        history["val"].append((record.step, val))
        return val, f"step {record.step}: train loss {record.loss:.4f}, validation loss {val:.4f}, lr {record.lr:.2e}"

    def on_interrupt(done: int) -> None:
        if done > start_step and dp.mode != "fsdp":  # FSDP2 would need all ranks to gather: not after an interrupt
            checkpoint(done, collective=False)
            log(f"interrupted: saved checkpoint at step {done} to {ckpt_dir} (continue with --resume)")

    loop = LoopConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                      grad_clip=args.grad_clip, eval_interval=args.eval_interval, save_interval=args.save_interval,
                      start_step=start_step, progress=args.progress and ctx.is_main, desc="train")
    run = run_loop(
        loop, optimizer, forward_backward=_graphed_forward_backward(model, args, device) if args.cuda_graph else None,
        micro_batches=sampler.micro_batches,
        loss_fn=lambda xy: lm_loss(model, xy[0].to(device), xy[1].to(device)),
        clip_params=model.parameters, precision=precision,
        sync=lambda last: gradient_sync(model, dp, enabled=last),
        reduce_loss=lambda loss: mean_over_ranks(loss, dp),
        before_step=lambda step: dp.counter.reset(),
        after_step=after_step, evaluate=eval_hook, checkpoint=checkpoint, on_interrupt=on_interrupt,
        postfix=lambda r: {"loss": f"{r.loss:.3f}",
                           "tok_s": f"{run_totals['tokens_seen'] / max(run_totals['train_time'], 1e-9):,.0f}"},
        log=log,
    )
    done = run.done
    train_time, tokens_seen = run_totals["train_time"], run_totals["tokens_seen"]
    comm_per_step = run_totals["comm_per_step"]
    if done > start_step:
        checkpoint(done)
        log(f"saved checkpoint (step {done}) to {ckpt_dir}")
    if ctx.is_main and plot_losses(history, out_dir / "loss.png"):
        log(f"loss curve: {out_dir / 'loss.png'}")

    sample = ""
    if args.sample_tokens > 0 and ctx.is_main:
        sampling_model = unwrap(model) if dp.mode != "fsdp" else load_checkpoint(ckpt_dir, device=device)
        sample = generate_sample(sampling_model, args.sample_prompt, args.sample_tokens, args.seed, device)
        log("sample:\n" + sample)
    recent = [v for _, v in history["train"][-20:]]
    summary = {
        "steps": done,
        "initial_val_loss": history["val"][0][1] if history["val"] else None,
        "final_val_loss": history["val"][-1][1] if history["val"] else None,
        "final_train_loss": sum(recent) / len(recent) if recent else None,
        "tokens_per_s": tokens_seen / train_time if train_time > 0 else None,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
        "n_params": n_params,
        "checkpoint": str(ckpt_dir),
        "sample": sample,
        "parallel": dp.mode,
        "world_size": ctx.world_size,
        "grad_accum": args.grad_accum,
        "comm_per_step": comm_per_step,
    }
    if ctx.is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    message = f"done: {done} steps"
    if history["val"]:
        message += f", validation loss {summary['initial_val_loss']:.4f} -> {summary['final_val_loss']:.4f}"
    if summary["tokens_per_s"]:
        message += f", {summary['tokens_per_s']:,.0f} tokens/s"
    if comm_per_step.get("total_bytes"):
        message += f", {comm_per_step['total_bytes']:,} bytes in gradient/parameter collectives per step"
    log(message + f", wall time {summary['wall_time_s']:.1f} s")
    return summary
