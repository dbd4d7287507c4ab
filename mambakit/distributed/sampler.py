"""Each data-parallel rank's share of a global batch, split further into gradient-accumulation micro-batches.

The global batch of step s is `BatchSampler.batch(s)`: `batch_size` rows. With world size W and A accumulation
micro-batches, rank r takes the contiguous rows [r·B/W, (r+1)·B/W) and micro-batch m of it the rows
[r·B/W + m·B/(W·A), r·B/W + (m+1)·B/(W·A)). The ranks' shares are disjoint and together make up the global
batch, so the averaged gradient equals the single-process gradient of the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mambakit.data import BatchSampler
from mambakit.errors import MambaKitError


def check_batch_split(batch_size: int, world_size: int, grad_accum: int) -> int:
    """The micro-batch size batch_size / (world_size · grad_accum); errors unless it divides evenly."""
    parts = world_size * grad_accum
    if grad_accum < 1:
        raise MambaKitError(f"--grad-accum must be a positive integer, got {grad_accum}")
    if batch_size % parts != 0 or batch_size < parts:
        raise MambaKitError(
            f"--batch-size {batch_size} (the global batch) must be a multiple of world size {world_size} × "
            f"--grad-accum {grad_accum} = {parts}, so that every rank and micro-batch gets the same number of "
            f"sequences; use e.g. --batch-size {max(parts, batch_size // parts * parts)} or change --grad-accum/--nproc"
        )
    return batch_size // parts


@dataclass
class ShardedBatchSampler:
    """The micro-batches of one rank: `global_sampler.batch(step)` split by rank, then by accumulation step."""

    global_sampler: BatchSampler
    rank: int = 0
    world_size: int = 1
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise MambaKitError(f"rank must lie in [0, world_size = {self.world_size}), got {self.rank}")
        self.micro_batch_size = check_batch_split(self.global_sampler.batch_size, self.world_size, self.grad_accum)

    @property
    def rank_rows(self) -> slice:
        """The rows of the global batch that belong to this rank."""
        per_rank = self.micro_batch_size * self.grad_accum
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `grad_accum` (inputs, targets) pairs of step `step`, each (micro_batch_size, seq_len)."""
        x, y = self.global_sampler.batch(step, rows=self.rank_rows)
        return list(zip(x.split(self.micro_batch_size), y.split(self.micro_batch_size)))
