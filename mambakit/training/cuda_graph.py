"""A training step's forward, loss and backward replayed as one CUDA graph.

A Mamba block's step is many short kernels; in eager mode the host (Python, autograd, the Triton launcher) can take
longer to issue them than the GPU takes to run them, and the GPU waits. Captured once, the whole forward + loss +
backward is one launch per step. For batches of one fixed shape (the usual pre-training case)::

    step = GraphedStep(lambda x, y: lm_loss(model, x, y), model.parameters(), (x0, y0), autocast_dtype=torch.bfloat16)
    for x, y in batches:
        loss = step(x, y)           # the gradients are now in each parameter's .grad (overwritten, not added)
        clip_grad_norm_(...); optimizer.step()       # eager, as usual; never zero_grad(set_to_none=True) in between

The graph owns the memory of every activation and gradient of the step (about the eager step's peak). What cannot
be captured fails at capture with the CUDA error; a batch of another shape or dtype, or a parameter whose .grad was
replaced or set to None, raises MambaKitError.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from mambakit.errors import MambaKitError


class GraphedStep:
    """loss_fn(*batch) -> scalar loss tensor, with its backward into `params`' .grad, as one CUDA graph.

    batch_example: CUDA tensors of the shapes and dtypes every later batch has (copied; their values only matter
    for the warm-up steps, whose gradients are dropped). autocast_dtype: run loss_fn under CUDA autocast to this
    dtype (None: no autocast). warmup: eager steps on a side stream before the capture (compiles, allocator).
    """

    def __init__(self, loss_fn: Callable[..., Tensor], params: Iterable[Tensor], batch_example: Sequence[Tensor],
                 autocast_dtype: Optional[torch.dtype] = None, warmup: int = 3):
        if not torch.cuda.is_available():
            raise MambaKitError("GraphedStep needs CUDA (a CUDA graph); got no CUDA device")
        for i, t in enumerate(batch_example):
            if not isinstance(t, Tensor) or not t.is_cuda:
                where = t.device if isinstance(t, Tensor) else type(t).__name__
                raise MambaKitError(f"batch_example[{i}] must be a CUDA tensor, got {where}")
        if warmup < 1:
            raise MambaKitError(f"warmup must be >= 1 (the capture needs compiled kernels), got {warmup}")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise MambaKitError("params must hold at least one tensor that requires grad")
        self.loss_fn = loss_fn
        self.autocast_dtype = autocast_dtype
        self.static = [t.detach().clone() for t in batch_example]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._drop_grads()
                self._forward_backward()
        torch.cuda.current_stream().wait_stream(side)
        self._drop_grads()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._forward_backward()
        self.grads = [p.grad for p in self.params]

    def _drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _forward_backward(self) -> Tensor:
        # the autocast cache is off: a cached cast made at capture would be a stale copy at replay
        ctx = (torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)
               if self.autocast_dtype is not None else contextlib.nullcontext())
        with ctx:
            loss = self.loss_fn(*self.static)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise MambaKitError(f"loss_fn must return a scalar tensor, got "
                                f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
        loss.backward()
        return loss.detach()

    def __call__(self, *batch: Tensor) -> Tensor:
        """Copy the batch into the graph's inputs, replay, return the loss (a tensor the next call overwrites)."""
        if len(batch) != len(self.static):
            raise MambaKitError(f"expected {len(self.static)} batch tensors (as at capture), got {len(batch)}")
        for i, (t, s) in enumerate(zip(batch, self.static)):
            if t.shape != s.shape or t.dtype != s.dtype:
                raise MambaKitError(f"batch[{i}] must have shape {tuple(s.shape)} and dtype {s.dtype} (as at "
                                    f"capture), got {tuple(t.shape)} {t.dtype}")
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                raise MambaKitError("a parameter's .grad was replaced or set to None since the capture (e.g. "
                                    "optimizer.zero_grad(set_to_none=True)); the graph writes the gradients into "
                                    "the tensors it captured: do not zero or replace them between steps")
        for t, s in zip(batch, self.static):
            s.copy_(t, non_blocking=True)
        self.graph.replay()
        return self.loss
