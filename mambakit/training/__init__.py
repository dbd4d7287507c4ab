"""The training engine shared by every trainer in mambakit (LM, synthetic tasks, Mamba-ND, ReMamba).

- `schedule`: `lr_at`, linear warmup then cosine decay to a floor.
- `optim`: `param_groups` (no weight decay for vectors, norms, A_log/D) and `adamw` (betas as an argument).
- `device`: `resolve_device` and the bf16 `precision_context`.
- `engine`: `run_loop`, the step loop (accumulation, clipping, evaluation / checkpoint hooks, progress), configured
  by `LoopConfig`, returning a `History`.
"""
from mambakit.training.device import precision_context, resolve_device
from mambakit.training.engine import History, LoopConfig, StepRecord, run_loop
from mambakit.training.optim import NO_DECAY_SUFFIXES, adamw, param_groups
from mambakit.training.schedule import lr_at

__all__ = ["History", "LoopConfig", "NO_DECAY_SUFFIXES", "StepRecord", "adamw", "lr_at", "param_groups",
           "precision_context", "resolve_device", "run_loop"]
