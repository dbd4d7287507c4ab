"""Continue training a checkpoint people already have (``mambakit train --init-from FOLDER``): any folder that
`mambakit.models.io.from_pretrained` reads (transformers mamba / mamba2 / falcon_mamba and the hybrids,
mamba_ssm, mambakit), on a text corpus tokenized by the folder's own tokenizer, fully or with LoRA adapters.

The loop, schedule, optimizer and loss are the LM trainer's (`mambakit.train`); the differences: the model and its
shape come from the folder, the data are token ids of the given tokenizer (not bytes), and the result is written in
transformers format (``checkpoint/`` holds config.json, model.safetensors and the source's tokenizer files), which
``mambakit generate --checkpoint`` and ``transformers.AutoModelForCausalLM.from_pretrained`` both read. With LoRA
(rank > 0) only the adapters on the in_proj and out_proj of every Mamba / Mamba-2 mixer train (attention, MLP and
embedding weights stay frozen); they are merged into the weights before each save.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from mambakit.data import BatchSampler, load_text_corpus
from mambakit.errors import MambaKitError
from mambakit.models.io.formats import from_pretrained, save_pretrained
from mambakit.remamba.lora import add_lora, merge_lora
from mambakit.train import BETAS, CHECKPOINT_SUBDIR, EPS, evaluate, lm_loss, plot_losses
from mambakit.training.device import precision_context, resolve_device
from mambakit.training.engine import LoopConfig, StepRecord, run_loop
from mambakit.training.optim import adamw, param_groups

#: the tokenizer files of a transformers folder, copied next to the fine-tuned weights when the source has them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "vocab.json", "merges.txt", "tokenizer.model")
VAL_FRACTION = 0.05


class Tokenizer(Protocol):
    """encode(text) -> token ids; decode(ids) -> text."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class FinetuneArgs:
    """Options of a fine-tuning run (all resolved: no None but `data`). lora_rank 0: full fine-tuning."""

    init_from: str
    out: str
    data: str | None = None
    steps: int = 100
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_batches: int = 4
    save_interval: int = 50
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    lora_rank: int = 0
    lora_alpha: float = 16.0
    sample_prompt: str = ""
    sample_tokens: int = 0
    overwrite: bool = False
    progress: bool = True


class TokenSampler(BatchSampler):
    """`BatchSampler` over a 1-D int64 tensor of token ids (the windows and their seeds as there)."""

    def __post_init__(self) -> None:
        if self.data.dim() != 1 or self.data.dtype != torch.long:
            raise MambaKitError(f"token data must be a 1-D int64 tensor, got {self.data.dim()}-D {self.data.dtype}")
        if self.data.numel() < self.seq_len + 1:
            raise MambaKitError(f"the data hold {self.data.numel()} tokens, fewer than --seq-len + 1 = "
                                f"{self.seq_len + 1}; use more data or a smaller --seq-len")


def tokenize_corpus(data: str | None, tokenizer: Tokenizer, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, validation ids), 1-D int64: the corpus decoded as UTF-8 (invalid bytes replaced), tokenized whole,
    the last VAL_FRACTION of the tokens held out. MambaKitError for an id outside the model's vocabulary."""
    text = load_text_corpus(data).decode("utf-8", errors="replace")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if ids.numel() < 2:
        raise MambaKitError(f"the data tokenize to {ids.numel()} token(s); need more text")
    if int(ids.max()) >= vocab_size or int(ids.min()) < 0:
        raise MambaKitError(f"the tokenizer gives id {int(ids.max())}, outside the model's vocabulary of {vocab_size}; "
                            "does the folder's tokenizer match its model?")
    n_val = max(1, int(ids.numel() * VAL_FRACTION))
    return ids[:-n_val], ids[-n_val:]


def _check_out(out: Path, overwrite: bool) -> Path:
    ckpt = out / CHECKPOINT_SUBDIR
    if ckpt.exists() and any(ckpt.iterdir()) and not overwrite:
        raise MambaKitError(f"--out {str(out)!r} already holds a checkpoint; replace it with --overwrite or choose "
                            "another --out")
    return ckpt


def finetune(args: FinetuneArgs, tokenizer: Tokenizer, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune `args.init_from` on `args.data` and write ``out/checkpoint`` (transformers format + the source's
    tokenizer files), ``out/summary.json`` and ``out/loss.png``; returns the summary (losses, steps, parameters)."""
    t_start = time.perf_counter()
    source, out = Path(args.init_from).expanduser(), Path(args.out).expanduser()
    ckpt = _check_out(out, args.overwrite)
    device = resolve_device(args.device)
    precision = precision_context(args.bf16, device)
    if args.batch_size % args.grad_accum:
        raise MambaKitError(f"--batch-size {args.batch_size} must be a multiple of --grad-accum {args.grad_accum}")
    model = from_pretrained(source, device=device, dtype=torch.float32)
    vocab = model.config.vocab_size
    train_ids, val_ids = tokenize_corpus(args.data, tokenizer, vocab)
    log(f"data: {args.data}: {train_ids.numel() + val_ids.numel():,} tokens ({train_ids.numel():,} train, "
        f"{val_ids.numel():,} validation)")
    sampler = TokenSampler(train_ids, args.batch_size, args.seq_len, seed=args.seed)
    val_sampler = TokenSampler(val_ids, args.batch_size, args.seq_len, seed=args.seed + 7919)
    val_batches = [val_sampler.batch(i) for i in range(args.eval_batches)]
    torch.manual_seed(args.seed)
    if args.lora_rank:
        model.requires_grad_(False)
        adapters = add_lora(model, args.lora_rank, args.lora_alpha)
        if not adapters:
            raise MambaKitError(f"--lora-rank: {source} has no Mamba layer to put LoRA adapters on")
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"model: {type(model).__name__} from {source}, {total:,} parameters, {trainable:,} trained "
        f"({'LoRA rank ' + str(args.lora_rank) if args.lora_rank else 'full fine-tuning'}); device {device}; "
        f"{args.steps} steps of {args.batch_size}x{args.seq_len} tokens")
    optimizer = adamw(param_groups(model, args.weight_decay), lr=args.lr, betas=BETAS, eps=EPS)
    micro = args.batch_size // args.grad_accum
    history: dict[str, list] = {"train": [], "val": []}

    def run_eval() -> float:
        with precision:
            return evaluate(model, val_batches, device)

    def micro_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = sampler.batch(step)
        return [(x[i:i + micro], y[i:i + micro]) for i in range(0, args.batch_size, micro)]

    def eval_hook(record: StepRecord) -> tuple[float, str]:
        val = run_eval()
        history["val"].append((record.step, val))
        return val, f"step {record.step}: train loss {record.loss:.4f}, validation loss {val:.4f}, lr {record.lr:.2e}"

    def save(step: int) -> None:
        save_finetuned(model, ckpt, source)

    history["val"].append((0, run_eval()))
    log(f"step 0: validation loss {history['val'][0][1]:.4f}")
    loop = LoopConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                      grad_clip=args.grad_clip, eval_interval=args.eval_interval, save_interval=args.save_interval,
                      progress=args.progress, desc="fine-tune")
    run = run_loop(loop, optimizer, micro_batches=micro_batches,
                   loss_fn=lambda xy: lm_loss(model, xy[0].to(device), xy[1].to(device)),
                   clip_params=lambda: [p for p in model.parameters() if p.requires_grad], precision=precision,
                   after_step=lambda r: history["train"].append((r.step, r.loss)), evaluate=eval_hook,
                   checkpoint=save, on_interrupt=lambda done: save(done) if done else None, log=log)
    save(run.done)
    log(f"saved the fine-tuned model (step {run.done}, transformers format) to {ckpt}")
    if plot_losses(history, out / "loss.png"):
        log(f"loss curve: {out / 'loss.png'}")
    sample = _sample(model, tokenizer, args, device) if args.sample_tokens and args.sample_prompt else ""
    if sample:
        log("sample:\n" + sample)
    summary = {"steps": run.done, "init_from": str(source), "lora_rank": args.lora_rank,
               "initial_val_loss": history["val"][0][1], "final_val_loss": history["val"][-1][1],
               "n_params": total, "n_trained": trainable, "train_time_s": run.train_time_s,
               "wall_time_s": time.perf_counter() - t_start, "checkpoint": str(ckpt), "sample": sample}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done: {run.done} steps, validation loss {summary['initial_val_loss']:.4f} -> "
        f"{summary['final_val_loss']:.4f}, wall time {summary['wall_time_s']:.1f} s")
    return summary


def save_finetuned(model: torch.nn.Module, ckpt: Path, source: Path) -> None:
    """Write `model` in transformers format into `ckpt` (LoRA adapters merged into a copy; the model keeps
    training with its adapters) with the tokenizer files of `source`."""
    import copy

    plain = model
    if any(type(m).__name__ == "LoRALinear" for m in model.modules()):
        plain = copy.deepcopy(model)
        merge_lora(plain)
    save_pretrained(plain, ckpt, format="hf")
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and source.resolve() != ckpt.resolve():
            shutil.copyfile(source / name, ckpt / name)


@torch.no_grad()
def _sample(model: torch.nn.Module, tokenizer: Tokenizer, args: FinetuneArgs, device: torch.device) -> str:
    ids = tokenizer.encode(args.sample_prompt)
    if not ids:
        return ""
    model.eval()
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens=args.sample_tokens, temperature=0.8,
                         top_p=0.95, seed=args.seed)
    model.train()
    return tokenizer.decode(out[0].tolist())
