"""`mambakit.training.run_loop`: per-step LR, accumulation = one big batch, clipping, hooks at the right steps,
early stops, divergence, interrupts."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from mambakit.errors import MambaKitError
from mambakit.training import LoopConfig, lr_at, run_loop

QUIET = dict(progress=False)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def data(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)


def mse(model: nn.Module):
    return lambda batch: ((model(batch[0]) - batch[1]) ** 2).mean()


def test_gradient_accumulation_equals_one_big_batch() -> None:
    x, y = data(8)
    big, acc = tiny_model(), tiny_model()
    cfg = LoopConfig(steps=5, lr=0.05, warmup_steps=2, grad_clip=0.0, **QUIET)
    opt_big = torch.optim.AdamW(big.parameters(), lr=0.05)
    opt_acc = torch.optim.AdamW(acc.parameters(), lr=0.05)
    h_big = run_loop(cfg, opt_big, lambda step: [(x, y)], mse(big))
    h_acc = run_loop(cfg, opt_acc, lambda step: [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], mse(acc))
    for p, q in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
    # the recorded loss is the mean over the micro-batches: the big batch's loss
    assert h_acc.losses == pytest.approx(h_big.losses, rel=1e-12)


def test_lr_follows_the_schedule_each_step() -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=123.0)
    seen = []
    cfg = LoopConfig(steps=12, lr=0.1, warmup_steps=3, min_lr_ratio=0.2, **QUIET)
    history = run_loop(cfg, opt, lambda step: [data(4)], mse(model),
                       before_step=lambda step: seen.append(step),
                       after_step=lambda r: seen.append(opt.param_groups[0]["lr"]))
    assert [r.step for r in history.records] == list(range(1, 13))
    assert [r.lr for r in history.records] == [lr_at(s, 12, 0.1, 3, 0.2) for s in range(12)]
    assert seen[0::2] == list(range(12)) and seen[1::2] == [r.lr for r in history.records]
    assert history.done == 12 and history.stopped is None and history.train_time_s > 0


def test_gradient_clipping_bounds_the_update() -> None:
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = data(8)
    cfg = LoopConfig(steps=1, lr=1.0, grad_clip=1e-3, **QUIET)
    run_loop(cfg, opt, lambda step: [(x, 100 * y)], mse(model))
    step_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach() - b)
                                                      for p, b in zip(model.parameters(), before)]))
    assert float(step_norm) == pytest.approx(1e-3, rel=1e-6)  # SGD with lr 1: the update is the clipped gradient


def test_eval_and_checkpoint_hooks_at_the_right_steps() -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    evals, saves = [], []

    def evaluate(record):
        evals.append(record.step)
        return -record.step, f"eval at {record.step}"

    logged: list[str] = []
    cfg = LoopConfig(steps=7, lr=0.01, eval_interval=3, save_interval=2, **QUIET)
    history = run_loop(cfg, opt, lambda step: [data(4)], mse(model), evaluate=evaluate,
                       checkpoint=saves.append, log=logged.append)
    assert evals == [3, 6, 7]  # every 3 steps and after the last
    assert saves == [2, 4, 6]  # every 2 steps, not after the last (the caller saves the final state)
    assert history.evals == [(3, -3), (6, -6), (7, -7)]
    assert logged == ["eval at 3", "eval at 6", "eval at 7"]  # no bar: messages go to the log


def test_resumed_loop_starts_at_start_step() -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    evals, saves, batches_asked = [], [], []

    def micro_batches(step):
        batches_asked.append(step)
        return [data(4, seed=step)]

    cfg = LoopConfig(steps=7, lr=0.01, eval_interval=3, save_interval=2, start_step=3, **QUIET)
    history = run_loop(cfg, opt, micro_batches, mse(model), evaluate=lambda r: evals.append(r.step) or (0, None),
                       checkpoint=saves.append)
    assert batches_asked == [3, 4, 5, 6] and [r.step for r in history.records] == [4, 5, 6, 7]
    assert evals == [6, 7] and saves == [4, 6] and history.done == 7
    nothing = run_loop(LoopConfig(steps=7, lr=0.01, start_step=7, **QUIET), opt, micro_batches, mse(model))
    assert nothing.records == [] and nothing.done == 7


def test_sync_and_precision_contexts_per_micro_batch() -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    events = []

    @contextlib.contextmanager
    def sync(last):
        events.append(("sync", last))
        yield

    class Precision:
        def __enter__(self):
            events.append("precision")

        def __exit__(self, *exc):
            return False

    cfg = LoopConfig(steps=2, lr=0.01, **QUIET)
    run_loop(cfg, opt, lambda step: [data(2), data(2), data(2)], mse(model), sync=sync, precision=Precision(),
             reduce_loss=lambda t: events.append("reduce") or float(t))
    one_step = [("sync", False), "precision", ("sync", False), "precision", ("sync", True), "precision", "reduce"]
    assert events == one_step * 2


def test_metrics_and_stop_hook() -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)

    def loss_fn(batch):
        return mse(model)(batch), {"size": float(batch[0].shape[0])}

    cfg = LoopConfig(steps=10, lr=0.01, eval_interval=2, **QUIET)
    history = run_loop(cfg, opt, lambda step: [data(3)], loss_fn, evaluate=lambda r: (r.step, None),
                       stop=lambda r, value: "enough" if value >= 4 else None, log=lambda m: None)
    assert history.done == 4 and history.stopped == "enough" and history.evals == [(2, 2), (4, 4)]
    assert all(r.metrics == {"size": 3.0} for r in history.records)


def test_max_time_stops_after_a_step() -> None:
    model = tiny_model()
    cfg = LoopConfig(steps=5, lr=0.01, max_time_s=1e-12, **QUIET)
    history = run_loop(cfg, torch.optim.AdamW(model.parameters()), lambda step: [data(2)], mse(model),
                       log=lambda m: None)
    assert history.done == 1 and "max_time" in history.stopped


def test_divergence_raises_unless_switched_off() -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    nan_loss = lambda batch: mse(model)(batch) * float("nan")  # noqa: E731
    with pytest.raises(MambaKitError, match="diverged at step 1"):
        run_loop(LoopConfig(steps=3, lr=0.01, **QUIET), opt, lambda step: [data(2)], nan_loss)
    history = run_loop(LoopConfig(steps=3, lr=0.01, check_finite=False, **QUIET), opt, lambda step: [data(2)],
                       nan_loss)
    assert history.done == 3


def test_interrupt_calls_the_hook_and_propagates() -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    interrupted = []

    def micro_batches(step):
        if step == 2:
            raise KeyboardInterrupt
        return [data(2)]

    with pytest.raises(KeyboardInterrupt):
        run_loop(LoopConfig(steps=5, lr=0.01, **QUIET), opt, micro_batches, mse(model),
                 on_interrupt=interrupted.append)
    assert interrupted == [2]  # two steps were done


def test_forward_backward_replaces_loss_and_keeps_gradient_tensors() -> None:
    """A forward_backward step (e.g. a CUDA graph) writes the gradients itself: the loop must not zero or replace
    them, and the result equals the plain loop's."""
    x, y = data(8)
    plain, own = tiny_model(), tiny_model()
    cfg = LoopConfig(steps=4, lr=0.05, grad_clip=1.0, **QUIET)
    h_plain = run_loop(cfg, torch.optim.AdamW(plain.parameters(), lr=0.05), lambda step: [(x, y)], mse(plain))
    for p in own.parameters():
        p.grad = torch.zeros_like(p)
    grads = [p.grad for p in own.parameters()]

    def forward_backward(batch):
        loss = mse(own)(batch)
        for g, d in zip(grads, torch.autograd.grad(loss, list(own.parameters()))):
            g.copy_(d)
        return loss.detach()

    h_own = run_loop(cfg, torch.optim.AdamW(own.parameters(), lr=0.05), lambda step: [(x, y)],
                     lambda batch: pytest.fail("loss_fn must not run"), forward_backward=forward_backward)
    assert all(p.grad is g for p, g in zip(own.parameters(), grads))
    assert h_own.losses == pytest.approx(h_plain.losses, rel=1e-12)
    for p, q in zip(plain.parameters(), own.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
    with pytest.raises(MambaKitError, match="one micro-batch"):
        run_loop(cfg, torch.optim.AdamW(own.parameters()), lambda step: [(x, y), (x, y)], mse(own),
                 forward_backward=forward_backward)
