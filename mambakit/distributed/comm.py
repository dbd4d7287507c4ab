"""Counting the bytes that data-parallel training hands to collectives, per optimizer step.

DDP: a communication hook (`DistributedDataParallel.register_comm_hook`) sees every gradient bucket it
all-reduces. FSDP2: custom all-gather and reduce-scatter objects (`FSDPModule.set_custom_all_gather` /
`set_custom_reduce_scatter`) see every unsharded-parameter all-gather and every gradient reduce-scatter.
Both forward to the ordinary torch.distributed collectives, so counting changes no result.

Byte counts are *logical* sizes: the all-reduced buffer, the all-gather output (the full, padded parameters)
and the reduce-scatter input (the full gradients). What a rank actually sends over the wire with ring
algorithms is 2(W−1)/W of the all-reduced bytes and (W−1)/W of the all-gathered or reduce-scattered bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist


@dataclass
class CommCounter:
    """Bytes (and calls) per collective kind; counts only while `active`."""

    active: bool = True
    bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, tensor: torch.Tensor) -> None:
        """Count one collective of `kind` over `tensor` (its numel × element size)."""
        if self.active:
            self.bytes[kind] = self.bytes.get(kind, 0) + tensor.numel() * tensor.element_size()
            self.calls[kind] = self.calls.get(kind, 0) + 1

    def reset(self) -> None:
        """Forget the counts so far."""
        self.bytes.clear()
        self.calls.clear()

    def snapshot(self) -> dict[str, Any]:
        """{"bytes": {kind: n}, "calls": {kind: n}, "total_bytes": n}: a copy of the counts."""
        return {"bytes": dict(self.bytes), "calls": dict(self.calls), "total_bytes": sum(self.bytes.values())}


def ddp_counting_hook(counter: CommCounter):
    """A DDP communication hook: all-reduce (mean) each gradient bucket, as DDP's default does, counting its bytes."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(process_group, bucket):  # no annotations: DDP checks them against the real classes, not strings
        """(process group or None, dist.GradBucket) -> Future of the averaged bucket buffer."""
        counter.add("all_reduce", bucket.buffer())
        return allreduce_hook(process_group, bucket)

    return hook


#: The collectives behind FSDP2's default comms (the older names on torch versions that lack the new ones).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _CountingComm:
    """What FSDP2 asks of a custom collective besides the call: a counter, and `allocate` for its buffer."""

    def __init__(self, counter: CommCounter) -> None:
        self.counter = counter

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised buffer for the collective (the all-gather output or reduce-scatter input)."""
        return torch.empty(*size, dtype=dtype, device=device)


class CountingAllGather(_CountingComm):
    """FSDP2 all-gather: an all-gather into one tensor, counting the gathered (output) bytes."""

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> dist.Work | None:
        self.counter.add("all_gather", output_tensor)
        return _all_gather(output_tensor, input_tensor, group=group, async_op=async_op)


class CountingReduceScatter(_CountingComm):
    """FSDP2 reduce-scatter: a reduce-scatter of one tensor, counting the full-gradient (input) bytes."""

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: Any, async_op: bool = False) -> dist.Work | None:
        self.counter.add("reduce_scatter", input_tensor)
        return _reduce_scatter(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
