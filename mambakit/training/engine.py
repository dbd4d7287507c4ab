"""The one training loop. The LM trainer, the synthetic tasks, Mamba-ND and ReMamba each call `run_loop` with their
own data, loss, evaluation and checkpoint; the loop owns the order of things and nothing else.

One step (0-based `step`; `done = step + 1` afterwards)::

    before_step(step)
    lr = lr_at(step, steps, lr, warmup_steps, min_lr_ratio)        set on every parameter group
    optimizer.zero_grad()
    batches = micro_batches(step)                                    n micro-batches (gradient accumulation)
    for i, batch in enumerate(batches):
        with sync(i == n - 1), precision:  loss = loss_fn(batch)     loss: a scalar tensor
        (loss / n).backward()
    clip_grad_norm_(clip_params(), grad_clip)                        when grad_clip > 0
    optimizer.step()
    record = StepRecord(done, loss: reduce_loss(mean of the n losses), lr, metrics, seconds, train_time_s)
    after_step(record)
    every eval_interval steps and at the last:  value, message = evaluate(record); then stop(record, value) may end it
    every save_interval steps except the last:  checkpoint(done)
    train_time_s >= max_time_s:                 end

Messages go to the progress bar when it is shown, else to `log`. A KeyboardInterrupt calls `on_interrupt(done)` and
propagates.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence, Union

import torch

from mambakit.errors import MambaKitError
from mambakit.training.schedule import lr_at

LossOut = Union[torch.Tensor, tuple[torch.Tensor, dict[str, float]]]


@dataclass
class LoopConfig:
    """What the loop does, step by step. Intervals of 0 (or None for max_time_s) switch a hook off."""

    steps: int
    lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; <= 0: no clipping
    eval_interval: int = 0  # evaluate every N steps and after the last one
    save_interval: int = 0  # checkpoint every N steps, except after the last one (the caller saves that)
    max_time_s: Optional[float] = None  # stop once this much training time (evaluations excluded) has passed
    start_step: int = 0  # the first step to run (a resumed run)
    check_finite: bool = True  # raise MambaKitError when a step's loss is not finite
    progress: bool = True  # a tqdm bar
    desc: str = "train"  # the bar's label


@dataclass
class StepRecord:
    """One finished step: `step` steps are done; its loss (mean over micro-batches), lr and metrics (from the last
    micro-batch), its seconds and the loop's training seconds so far."""

    step: int
    loss: float
    lr: float
    metrics: dict[str, float]
    seconds: float
    train_time_s: float


@dataclass
class History:
    """What `run_loop` returns: the step records, (step, value) of each evaluation, the training time (evaluations
    and checkpoints excluded), the steps done (start_step included), and why the loop ended early (None: it ran all
    steps)."""

    records: list[StepRecord] = field(default_factory=list)
    evals: list[tuple[int, Any]] = field(default_factory=list)
    train_time_s: float = 0.0
    done: int = 0
    stopped: Optional[str] = None

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self.records]


def _nothing(*args: Any) -> None:
    return None


def run_loop(
    cfg: LoopConfig,
    optimizer: torch.optim.Optimizer,
    micro_batches: Callable[[int], Sequence[Any]],
    loss_fn: Callable[[Any], LossOut],
    *,
    clip_params: Optional[Callable[[], Iterable[torch.Tensor]]] = None,
    precision: Optional[ContextManager] = None,
    sync: Optional[Callable[[bool], ContextManager]] = None,
    reduce_loss: Callable[[torch.Tensor], float] = float,
    before_step: Callable[[int], None] = _nothing,
    after_step: Callable[[StepRecord], None] = _nothing,
    evaluate: Optional[Callable[[StepRecord], tuple[Any, Optional[str]]]] = None,
    stop: Optional[Callable[[StepRecord, Any], Optional[str]]] = None,
    checkpoint: Optional[Callable[[int], None]] = None,
    on_interrupt: Optional[Callable[[int], None]] = None,
    postfix: Optional[Callable[[StepRecord], dict[str, str]]] = None,
    log: Callable[[str], None] = print,
    forward_backward: Optional[Callable[[Any], torch.Tensor]] = None,
) -> History:
    """Run steps `cfg.start_step` .. `cfg.steps - 1` (see the module docstring for one step) and return the history.

    micro_batches(step): the step's micro-batches (one for no accumulation); loss_fn(batch): the loss to minimise,
    a scalar tensor, or (loss, metrics) with float metrics. clip_params: the tensors whose gradient norm is clipped
    (default: the optimizer's). precision: an autocast context entered around each forward (default: none).
    sync(is_last): a context around each micro-batch's forward and backward (data parallel: the gradient
    collective on the last one only). reduce_loss: the mean loss tensor -> float (data parallel: the mean over
    ranks). evaluate(record) -> (value, message or None); stop(record, value) -> a message to end the run, or None.
    postfix(record): the bar's postfix (default: the loss).
    forward_backward(batch): instead of loss_fn, precision and backward: one call that runs the forward and the
    backward itself and returns the detached loss, writing (not adding) the gradients, e.g. a
    `mambakit.training.cuda_graph.GraphedStep`; the loop then does not zero the gradients, and a step must have
    exactly one micro-batch.
    """
    from tqdm.auto import tqdm

    if clip_params is None:
        def clip_params() -> list[torch.Tensor]:
            return [p for group in optimizer.param_groups for p in group["params"]]
    precision = precision if precision is not None else contextlib.nullcontext()
    history = History(done=cfg.start_step)
    bar = tqdm(total=cfg.steps, initial=min(cfg.start_step, cfg.steps), disable=not cfg.progress,
               dynamic_ncols=True, desc=cfg.desc)
    write = bar.write if cfg.progress else log
    try:
        for step in range(cfg.start_step, cfg.steps):
            t0 = time.perf_counter()
            before_step(step)
            lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if forward_backward is None:
                optimizer.zero_grad(set_to_none=True)
            batches = micro_batches(step)
            n = len(batches)
            if forward_backward is not None and n != 1:
                raise MambaKitError(f"forward_backward needs one micro-batch per step, got {n} at step {step}")
            loss_sum: Any = None
            metrics: dict[str, float] = {}
            for i, batch in enumerate(batches):
                if forward_backward is not None:
                    loss = forward_backward(batch)
                    loss_sum = loss.detach()
                    continue
                with sync(i == n - 1) if sync is not None else contextlib.nullcontext():
                    with precision:
                        out = loss_fn(batch)
                    loss, metrics = out if isinstance(out, tuple) else (out, {})
                    (loss / n if n > 1 else loss).backward()
                loss_sum = loss.detach() if i == 0 else loss_sum + loss.detach()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(clip_params(), cfg.grad_clip)
            optimizer.step()
            loss_value = reduce_loss(loss_sum / n if n > 1 else loss_sum)
            done = step + 1
            if cfg.check_finite and not math.isfinite(loss_value):
                raise MambaKitError(f"training diverged at step {done} (loss {loss_value}); try a smaller --lr")
            seconds = time.perf_counter() - t0
            history.train_time_s += seconds
            history.done = done
            record = StepRecord(done, loss_value, lr, metrics, seconds, history.train_time_s)
            history.records.append(record)
            after_step(record)
            bar.update(1)
            if evaluate is not None and cfg.eval_interval > 0 and (done % cfg.eval_interval == 0 or done == cfg.steps):
                value, message = evaluate(record)
                history.evals.append((done, value))
                if message:
                    write(message)
                reason = stop(record, value) if stop is not None else None
                if reason:
                    history.stopped = reason
                    write(reason)
                    break
            bar.set_postfix(postfix(record) if postfix is not None else {"loss": f"{loss_value:.3f}"})
            if checkpoint is not None and cfg.save_interval > 0 and done % cfg.save_interval == 0 \
                    and done != cfg.steps:
                checkpoint(done)
            if cfg.max_time_s is not None and history.train_time_s >= cfg.max_time_s and done < cfg.steps:
                history.stopped = (f"step {done}: {history.train_time_s:.0f} s of training >= max_time "
                                   f"{cfg.max_time_s}; stopping")
                write(history.stopped)
                break
    except KeyboardInterrupt:
        bar.close()
        if on_interrupt is not None:
            on_interrupt(history.done)
        raise
    finally:
        bar.close()
    return history
