"""Training ReMamba's added parameters on a frozen base LM, with the LM loss on the answer only.

Trained: q, k, v, b (mode "remamba"), plus optionally LoRA adapters on in_proj/out_proj (`lora_rank` > 0) and the dt
projection in full (`train_dt`). Everything else in the base stays frozen. In mode "plain" the same loop fine-tunes
LoRA / dt only with a plain forward pass: the baseline "same extra parameter budget spent on plain fine-tuning".

As in the paper, p, rho and s are drawn per example (s = 0, p ~ U(0.1, 0.3), rho ~ U(0.05, 0.2) by default), so
examples run one at a time (their compressed lengths differ) and gradients are accumulated over a batch: each
example is one micro-batch of the training engine (`mambakit.training.run_loop`).
Stage 1 runs the base without gradient: with LoRA, the adapters learn through stage 2 only.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.remamba.config import ReMambaConfig
from mambakit.remamba.lora import add_lora, dt_parameters
from mambakit.remamba.model import ReMambaLM
from mambakit.training import LoopConfig, StepRecord, adamw, run_loop

#: AdamW of ReMamba: torch's default betas, weight decay on every trained parameter.
BETAS = (0.9, 0.999)

MODES = ("remamba", "plain")
#: draws a batch: generator -> (prompts (batch, L), answers (batch, A)) int64
BatchFn = Callable[[torch.Generator], tuple[Tensor, Tensor]]


def _check_range(name: str, value: Any, low: float, high: float) -> tuple[float, float]:
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    if not ok or not low <= value[0] <= value[1] <= high:
        raise MambaKitError(f"ReMambaTrainConfig.{name} must be (low, high) with {low} <= low <= high <= {high}, "
                            f"got {value!r}")
    return float(value[0]), float(value[1])


@dataclass
class ReMambaTrainConfig:
    """steps x batch examples; AdamW with lr, linear warmup then cosine decay to lr / 10, gradient clipping."""

    mode: str = "remamba"
    steps: int = 200
    batch: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 20
    grad_clip: float = 1.0
    lora_rank: int = 0
    lora_alpha: float = 1.0
    train_dt: bool = False
    p_range: tuple[float, float] = (0.1, 0.3)
    rho_range: tuple[float, float] = (0.05, 0.2)
    s_range: tuple[float, float] = (0.0, 0.0)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise MambaKitError(f"ReMambaTrainConfig.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("steps", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MambaKitError(f"ReMambaTrainConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("lora_rank", "warmup", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MambaKitError(f"ReMambaTrainConfig.{name} must be an integer >= 0, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise MambaKitError(f"ReMambaTrainConfig.lr must be positive, got {self.lr!r}")
        self.p_range = _check_range("p_range", self.p_range, 1e-9, 1.0)
        self.rho_range = _check_range("rho_range", self.rho_range, 1e-9, 1.0)
        self.s_range = _check_range("s_range", self.s_range, 0.0, 1.0 - 1e-9)
        if self.mode == "plain" and self.lora_rank == 0 and not self.train_dt:
            raise MambaKitError("ReMambaTrainConfig: mode 'plain' needs lora_rank > 0 or train_dt=True "
                                "(nothing to train otherwise)")

    def sample(self, g: torch.Generator) -> ReMambaConfig:
        """One per-example ReMambaConfig with p, rho, s drawn uniformly from their ranges."""
        u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        pick = lambda r, x: r[0] + (r[1] - r[0]) * x  # noqa: E731
        return ReMambaConfig(p=pick(self.p_range, u[0]), rho=pick(self.rho_range, u[1]), s=pick(self.s_range, u[2]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare(lm: ReMambaLM, cfg: ReMambaTrainConfig) -> list[nn.Parameter]:
    """Freeze the base, add LoRA if asked, and return the parameters to train (in a fixed order)."""
    for p in lm.base.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    if cfg.mode == "remamba":
        params += list(lm.adapter.parameters())
    else:
        for p in lm.adapter.parameters():
            p.requires_grad_(False)
    if cfg.lora_rank > 0:
        params += add_lora(lm.base, cfg.lora_rank, cfg.lora_alpha)
    if cfg.train_dt:
        params += dt_parameters(lm.base)
    for p in params:
        p.requires_grad_(True)
    return params


def answer_loss_plain(base: nn.Module, prompts: Tensor, answers: Tensor) -> Tensor:
    """Mean cross-entropy of the answers (batch, A) after the prompts (batch, L), plain forward pass of `base`
    (a MambaLMHeadModel), computed without the logits (`forward(return_logits=False)`)."""
    ids = torch.cat([prompts, answers[:, :-1]], dim=1)
    return base(ids, labels=answers, num_last_tokens=answers.shape[1], return_logits=False).loss


def train_added(lm: ReMambaLM, batches: BatchFn, cfg: ReMambaTrainConfig,
                log: Optional[Callable[[str], None]] = None, log_every: int = 50) -> dict[str, Any]:
    """Train the added parameters of `lm` on batches from `batches`. Returns {'losses': per step,
    'n_trainable': count, 'seconds': wall time}."""
    params = prepare(lm, cfg)
    n_trainable = sum(p.numel() for p in params)
    opt = adamw(params, lr=cfg.lr, betas=BETAS, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    g_span = torch.Generator().manual_seed(cfg.seed + 1)
    lm.train()
    losses: list[float] = []
    example_losses: list[float] = []  # of the current step; the step's loss is their float64 mean

    def micro_batches(step: int) -> list[tuple[Tensor, Tensor]]:
        prompts, answers = batches(g)
        if cfg.mode == "plain":
            return [(prompts, answers)]
        return [(prompts[i:i + 1], answers[i:i + 1]) for i in range(prompts.shape[0])]

    def loss_fn(batch: tuple[Tensor, Tensor]) -> Tensor:
        prompts, answers = batch
        if cfg.mode == "plain":
            loss = answer_loss_plain(lm.base, prompts, answers)
        else:
            loss = lm(prompts, cfg.sample(g_span), answer_ids=answers, return_logits=False).loss
        example_losses.append(float(loss.detach()))
        return loss

    def after_step(r: StepRecord) -> None:
        losses.append(sum(v / len(example_losses) for v in example_losses))
        example_losses.clear()
        if log is not None and r.step % log_every == 0:
            recent = losses[-log_every:]
            log(f"[{cfg.mode}] step {r.step}/{cfg.steps} loss {sum(recent) / len(recent):.4f} "
                f"({time.time() - t0:.0f} s)")

    loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup, min_lr_ratio=0.1, grad_clip=cfg.grad_clip,
                      check_finite=False, progress=False)
    t0 = time.time()
    run_loop(loop, opt, micro_batches, loss_fn, clip_params=lambda: params, after_step=after_step)
    lm.eval()
    return {"losses": losses, "n_trainable": n_trainable, "seconds": time.time() - t0}
