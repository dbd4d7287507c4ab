"""Data-parallel wrapping of a `MambaLMHeadModel`: DDP (replicated) or FSDP2 (sharded), and its checkpoints.

One path, three modes (`DataParallelConfig.mode`):

- ``"single"``: a plain module in one process (no wrapping, no collectives).
- ``"ddp"``: `torch.nn.parallel.DistributedDataParallel`; every rank keeps the full model and optimizer state;
  gradients are all-reduced (mean over ranks) once per optimizer step.
- ``"fsdp"``: `torch.distributed.fsdp.fully_shard` on every block, then on the whole model (embedding, final
  norm and the tied head form the root group). Parameters, gradients and optimizer state are DTensors sharded
  on dim 0; each block's parameters are all-gathered for its forward and again for its backward, and its
  gradients reduce-scattered.

Checkpoints are always consolidated: full tensors on rank 0 in the single-process format (safetensors weights,
`optimizer.state_dict()` with integer parameter ids in `param_groups` order). The parameter order is the same
in every mode, so a checkpoint of any mode and world size resumes in any other.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from mambakit.distributed.comm import (
    CommCounter,
    CountingAllGather,
    CountingReduceScatter,
    ddp_counting_hook,
)
from mambakit.distributed.launch import DistContext
from mambakit.errors import MambaKitError

MODES = ("single", "ddp", "fsdp")


@dataclass
class DataParallelConfig:
    """How the model is replicated or sharded over the ranks of `ctx`; `counter` collects collective bytes."""

    ctx: DistContext
    fsdp: bool = False
    counter: CommCounter = field(default_factory=CommCounter)

    @property
    def mode(self) -> str:
        """"single", "ddp" or "fsdp"."""
        if not self.ctx.distributed:
            return "single"
        return "fsdp" if self.fsdp else "ddp"

    def __post_init__(self) -> None:
        if self.fsdp and not self.ctx.distributed:
            raise MambaKitError("--fsdp needs a distributed launch (torchrun --nproc-per-node N -m mambakit train "
                                "... or mambakit train --nproc N), but this is a single process")


def wrap_model(model: torch.nn.Module, cfg: DataParallelConfig) -> torch.nn.Module:
    """The model to train: `model` itself (single, and FSDP2, which shards it in place) or a DDP wrapper.

    The model must already be on `cfg.ctx.device` with identical initial weights on every rank
    (same seed, or the same checkpoint).
    """
    if cfg.mode == "single":
        return model
    if cfg.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [cfg.ctx.device.index] if cfg.ctx.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids)
        ddp.register_comm_hook(None, ddp_counting_hook(cfg.counter))
        return ddp
    from torch.distributed.fsdp import fully_shard

    for block in model.backbone.layers:
        fully_shard(block)
    fully_shard(model)
    for module in model.modules():
        if hasattr(module, "set_custom_all_gather"):
            module.set_custom_all_gather(CountingAllGather(cfg.counter))
            module.set_custom_reduce_scatter(CountingReduceScatter(cfg.counter))
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The `MambaLMHeadModel` inside a DDP wrapper (FSDP2 and plain models are returned as they are)."""
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, cfg: DataParallelConfig, enabled: bool) -> Iterator[None]:
    """Run a micro-batch's forward and backward with (enabled) or without the gradient collective.

    With gradient accumulation only the last micro-batch synchronises: DDP's `no_sync` and FSDP2's
    `set_requires_gradient_sync(False)` keep the local gradients adding up until then.
    """
    if cfg.mode == "ddp" and not enabled:
        with model.no_sync():
            yield
    elif cfg.mode == "fsdp":
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def mean_over_ranks(value: torch.Tensor, cfg: DataParallelConfig) -> float:
    """The mean of a scalar tensor over all ranks (one 4-byte all-reduce; the value itself in one process)."""
    if cfg.mode == "single":
        return float(value)
    t = value.detach().float().reshape(1).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / cfg.ctx.world_size


def _full(t: Any) -> Any:
    """A DTensor gathered to a full CPU tensor (a collective: every rank must call it); tensors to CPU."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu")
    return t


def consolidated_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       cfg: DataParallelConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full model and optimizer state dicts on CPU, as one process would have them.

    FSDP: every rank must call this (each sharded tensor is all-gathered); DDP and single: no collective.
    """
    inner = unwrap(model)
    model_state = {k: _full(v) for k, v in inner.state_dict().items()}
    opt = optimizer.state_dict()
    state = {pid: {k: _full(v) for k, v in s.items()} for pid, s in opt["state"].items()}
    return model_state, {"state": state, "param_groups": opt["param_groups"]}


def shard_optimizer_state(opt_state: dict[str, Any], optimizer: torch.optim.Optimizer,
                          cfg: DataParallelConfig) -> dict[str, Any]:
    """A consolidated optimizer state dict made fit for `optimizer`: under FSDP2 each full tensor of a
    parameter's shape is cut into this rank's shard (no communication); otherwise it is returned as is."""
    if cfg.mode != "fsdp":
        return opt_state
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in opt_state["param_groups"] for i in group["params"]]
    if len(saved_ids) != len(params):
        raise MambaKitError(f"the checkpoint's optimizer state holds {len(saved_ids)} parameters, the model "
                            f"{len(params)}; it belongs to another model")
    state: dict[Any, Any] = {}
    for pid, p in zip(saved_ids, params):
        if pid not in opt_state["state"]:
            continue
        entry = {}
        for key, value in opt_state["state"][pid].items():
            if isinstance(p, DTensor) and isinstance(value, torch.Tensor) and value.shape == p.shape:
                value = distribute_tensor(value.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                          src_data_rank=None)
            entry[key] = value
        state[pid] = entry
    return {"state": state, "param_groups": opt_state["param_groups"]}


def expected_comm_bytes(model: torch.nn.Module, mode: str, world_size: int, grad_accum: int = 1) -> dict[str, int]:
    """The design's bytes per optimizer step for an (unsharded, unwrapped) model, by collective.

    DDP: one all-reduce of every gradient (= parameter bytes, tied weights once), whatever `grad_accum`.
    FSDP2: per micro-batch, each group's parameters (dim 0 padded to a multiple of `world_size`) are
    all-gathered for forward and, except the root group (kept unsharded from forward to backward), again for
    backward; the gradients are reduce-scattered once per step.
    """
    if mode not in MODES:
        raise MambaKitError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "single":
        return {}

    def padded(params: list[torch.nn.Parameter]) -> int:
        total = 0
        for p in params:
            rows = -(-p.shape[0] // world_size) * world_size if p.dim() else world_size
            total += rows * (p.numel() // max(p.shape[0], 1) if p.dim() else 1) * p.element_size()
        return total

    unique = list(dict.fromkeys(model.parameters()))
    if mode == "ddp":
        return {"all_reduce": sum(p.numel() * p.element_size() for p in unique)}
    block_ids = {id(p) for block in model.backbone.layers for p in block.parameters()}
    blocks = padded([p for p in unique if id(p) in block_ids])
    root = padded([p for p in unique if id(p) not in block_ids])
    return {"all_gather": grad_accum * (2 * blocks + root), "reduce_scatter": blocks + root}
